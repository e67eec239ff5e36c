//! `bench --gateway`: a GET proxied by the running agent's gateway against the same GET
//! sent directly by this process with the client's cached token (`OAuthClient::call`),
//! interleaved in one run so that machine noise hits both sides alike. Both sides sign one
//! DPoP proof per request; the difference is the agent's HTTP hop and its streaming.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::{BenchError, Phase, load};
use crate::agent::gateway::Route;
use crate::oauth::api::ApiRequest;
use crate::oauth::client::OAuthClient;

/// What one gateway run measured.
#[derive(Clone, Debug, Serialize)]
pub struct GatewayReport {
    pub route: String,
    /// The path below the route, with its query.
    pub path: String,
    pub callers: usize,
    pub seconds: f64,
    /// GETs per second sent directly with the cached token.
    pub direct_per_s: f64,
    /// GETs per second through the agent's gateway.
    pub gateway_per_s: f64,
    /// gateway / direct.
    pub ratio: f64,
    pub direct_p50_us: u64,
    pub direct_p99_us: u64,
    pub gateway_p50_us: u64,
    pub gateway_p99_us: u64,
}

/// `clients` concurrent callers on each side, alternating phases of about half a second
/// for `seconds` in all, after an uncounted warm-up (the token fetched, connections open).
pub fn run_gateway(
    client: OAuthClient,
    route: &Route,
    socket: &Path,
    path: &str,
    clients: usize,
    seconds: f64,
) -> Result<GatewayReport, BenchError> {
    let path = if path.starts_with('/') {
        path.to_owned()
    } else {
        format!("/{path}")
    };
    let (below, query) = match path.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path.as_str(), None),
    };
    let url = route
        .upstream_url(below, query)
        .map_err(|e| BenchError::Agent(format!("route '{}': {e}", route.name)))?;
    let gw_path = format!("/gw/{}{path}", route.name);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| BenchError::Agent(format!("cannot start the async runtime: {e}")))?;
    let client = Arc::new(client);
    let direct = |phase: Duration| {
        let (client, url) = (client.clone(), url.clone());
        runtime.block_on(direct_phase(client, url, clients, phase))
    };
    let proxied =
        |phase: Duration| runtime.block_on(load::get_phase(socket, &gw_path, clients, phase));
    let rounds = (seconds.round() as u32).clamp(1, 600);
    let phase = Duration::from_secs_f64((seconds / f64::from(2 * rounds)).max(0.05));
    direct(Duration::from_millis(200))?;
    proxied(Duration::from_millis(200))?;
    let (mut d, mut g) = ((0u64, Vec::new()), (0u64, Vec::new()));
    for _ in 0..rounds {
        let (n, mut lat) = direct(phase)?;
        d.0 += n;
        d.1.append(&mut lat);
        let (n, mut lat) = proxied(phase)?;
        g.0 += n;
        g.1.append(&mut lat);
    }
    let secs = phase.as_secs_f64() * f64::from(rounds);
    let (direct_per_s, gateway_per_s) = (d.0 as f64 / secs, g.0 as f64 / secs);
    Ok(GatewayReport {
        route: route.name.clone(),
        path,
        callers: clients,
        seconds: 2.0 * secs,
        direct_per_s,
        gateway_per_s,
        ratio: if direct_per_s > 0.0 {
            gateway_per_s / direct_per_s
        } else {
            0.0
        },
        direct_p50_us: super::percentile(&mut d.1, 0.50),
        direct_p99_us: super::percentile(&mut d.1, 0.99),
        gateway_p50_us: super::percentile(&mut g.1, 0.50),
        gateway_p99_us: super::percentile(&mut g.1, 0.99),
    })
}

/// `clients` tasks each sending the GET with the cached token until the deadline; any
/// answer but 200 ends the run with it.
async fn direct_phase(
    client: Arc<OAuthClient>,
    url: url::Url,
    clients: usize,
    phase: Duration,
) -> Result<Phase, BenchError> {
    let until = Instant::now() + phase;
    let mut tasks = Vec::new();
    for _ in 0..clients.max(1) {
        let (client, url) = (client.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let request = ApiRequest {
                method: http::Method::GET,
                url,
                headers: Vec::new(),
                body: None,
            };
            let mut clock = super::CallerClock::new(until);
            while clock.going() {
                let r = client.call(&request).await?;
                if r.status != http::StatusCode::OK {
                    return Err(BenchError::Agent(format!(
                        "the upstream answered {}",
                        r.error_line()
                    )));
                }
                clock.answered();
            }
            Ok::<_, BenchError>(clock.lat)
        }));
    }
    load::joined(tasks).await
}
