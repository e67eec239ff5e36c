//! `token` and `call`: keybound's main job, on a small tokio runtime.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use http::{HeaderName, HeaderValue, Method};
use keybound::config::Config;
use keybound::jose;
use keybound::keyring::Keyring;
use keybound::oauth::api::{ApiRequest, ApiResponse};
use keybound::oauth::client::OAuthClient;
use keybound::oauth::secret::SecretString;
use keybound::oauth::settings::{endpoint_url, origin};
use secrecy::ExposeSecret as _;
use serde_json::json;

use super::agent::AgentSocket;

/// Exit status when the API answered with an HTTP error.
const HTTP_ERROR: u8 = 4;

#[derive(clap::Args)]
pub struct CallArgs {
    /// The [[client]] to use (default: the only one)
    #[arg(long)]
    client: Option<String>,
    /// HTTP method (default: GET, or POST with -d)
    #[arg(short = 'X', long = "request", value_name = "METHOD")]
    method: Option<String>,
    /// Request body, or @FILE to read it from a file (@- for stdin)
    #[arg(short = 'd', long = "data", value_name = "DATA|@FILE")]
    data: Option<String>,
    /// Extra header 'Name: value'; repeatable
    #[arg(short = 'H', long = "header", value_name = "'Name: value'")]
    headers: Vec<String>,
    /// Follow Link rel="next" and print every page as one JSON array
    #[arg(long)]
    paginate: bool,
    /// Call in this process, not through a running agent
    #[arg(long)]
    no_agent: bool,
    /// The URL to call
    url: String,
}

fn open_client(config: &Config, name: Option<&str>) -> anyhow::Result<OAuthClient> {
    let settings = config.client(name).map_err(anyhow::Error::msg)?.clone();
    let keyring = Keyring::open(&config.token, config.policy.clone(), None)?;
    Ok(OAuthClient::new(settings, &keyring)?)
}

/// The config, and the agent to go through (`None`: in-process). With
/// `KEYBOUND_AGENT_SOCK` set the config may be missing, as long as `--client` names the
/// client.
fn setup(
    config: Option<&Path>,
    no_agent: bool,
) -> anyhow::Result<(anyhow::Result<Config>, Option<AgentSocket>)> {
    let loaded = Config::load(config)
        .map(|(c, _)| c)
        .map_err(anyhow::Error::from);
    let agent = super::agent::reach(loaded.as_ref().ok(), no_agent)?;
    Ok((loaded, agent))
}

/// The client's name for the agent: `--client`, else the config's only client.
fn client_name(config: anyhow::Result<Config>, name: Option<&str>) -> anyhow::Result<String> {
    match name {
        Some(n) => Ok(n.to_owned()),
        None => Ok(config?
            .client(None)
            .map_err(anyhow::Error::msg)?
            .name
            .clone()),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// A token and, for `--check`, where it came from; the same whether the agent or this
/// process fetched it.
struct TokenView {
    token_type: String,
    expires_in: Option<u64>,
    scopes: Vec<String>,
    secret: SecretString,
    check: Option<CheckView>,
}

struct CheckView {
    client: String,
    server: String,
    endpoint: String,
    assertion_key: String,
    /// The DPoP key as printed, and its kid.
    dpop_key: Option<(String, String)>,
    allowed_scopes: Vec<String>,
    round_trips: u32,
    /// Through the agent: whether the agent had the token cached.
    cached: Option<bool>,
    clock_offset: Option<i64>,
}

pub fn token(
    config: Option<&Path>,
    client: Option<&str>,
    as_json: bool,
    check: bool,
    no_agent: bool,
) -> anyhow::Result<ExitCode> {
    let (loaded, agent) = setup(config, no_agent)?;
    let rt = runtime()?;
    let view = match agent {
        Some(agent) => {
            let name = client_name(loaded, client)?;
            rt.block_on(token_via_agent(agent, &name, check))?
        }
        None => {
            let client = open_client(&loaded?, client)?;
            rt.block_on(token_in_process(&client, check))?
        }
    };
    print_token(&view, as_json)?;
    Ok(ExitCode::SUCCESS)
}

async fn token_in_process(client: &OAuthClient, check: bool) -> anyhow::Result<TokenView> {
    let token = client.token().await?;
    let check = match check {
        false => None,
        true => {
            let c = client.config();
            let endpoint = client.endpoint().await?.clone();
            let dpop = token.dpop_key.clone().or_else(|| client.dpop_key());
            let assertion = client.assertion_key();
            Some(CheckView {
                client: c.name.clone(),
                server: c.server.name().to_owned(),
                endpoint: endpoint.to_string(),
                assertion_key: key_line(assertion.label(), assertion.alg().name(), assertion.kid()),
                dpop_key: dpop.map(|k| {
                    (
                        key_line(k.label(), k.alg().name(), k.kid()),
                        k.kid().to_owned(),
                    )
                }),
                allowed_scopes: c.allowed_scopes.clone(),
                round_trips: token.round_trips,
                cached: None,
                clock_offset: client.state().offset(&origin(&endpoint)),
            })
        }
    };
    Ok(TokenView {
        token_type: token.token_type.clone(),
        expires_in: token.expires_in,
        scopes: token.scopes.clone(),
        secret: token.secret.clone(),
        check,
    })
}

async fn token_via_agent(
    agent: AgentSocket,
    client: &str,
    check: bool,
) -> anyhow::Result<TokenView> {
    let socket = agent.path().display().to_string();
    let v = agent
        .post("/v1/token", &json!({ "client": client, "details": check }))
        .await?;
    let missing = |what: &str| anyhow::anyhow!("the agent at {socket} answered without {what}");
    let text = |v: &serde_json::Value, k: &str| -> anyhow::Result<String> {
        v[k].as_str().map(str::to_owned).ok_or_else(|| missing(k))
    };
    let secret = SecretString::from(text(&v, "access_token")?);
    let check = match check {
        false => None,
        true => {
            let d = &v["details"];
            let key = |k: &serde_json::Value| -> anyhow::Result<(String, String)> {
                let kid = text(k, "kid")?;
                Ok((key_line(&text(k, "label")?, &text(k, "alg")?, &kid), kid))
            };
            Some(CheckView {
                client: text(d, "client")?,
                server: text(d, "server")?,
                endpoint: text(d, "token_endpoint")?,
                assertion_key: key(&d["assertion_key"])?.0,
                dpop_key: match &d["dpop_key"] {
                    serde_json::Value::Null => None,
                    k => Some(key(k)?),
                },
                allowed_scopes: serde_json::from_value(d["allowed_scopes"].clone())
                    .map_err(|_| missing("details.allowed_scopes"))?,
                round_trips: d["round_trips"]
                    .as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| missing("details.round_trips"))?,
                cached: d["cached"].as_bool(),
                clock_offset: d["clock_offset"].as_i64(),
            })
        }
    };
    Ok(TokenView {
        token_type: text(&v, "token_type")?,
        expires_in: v["expires_in"].as_u64(),
        scopes: text(&v, "scope")?
            .split_whitespace()
            .map(str::to_owned)
            .collect(),
        secret,
        check,
    })
}

fn key_line(label: &str, alg: &str, kid: &str) -> String {
    format!("'{label}' {alg} kid {kid}")
}

fn print_token(token: &TokenView, as_json: bool) -> anyhow::Result<()> {
    let jkt = jwt_claims(token.secret.expose_secret())
        .and_then(|c| c["cnf"]["jkt"].as_str().map(str::to_string));
    let scope = token.scopes.join(" ");
    if let Some(c) = &token.check {
        let dpop_kid = c.dpop_key.as_ref().map(|(_, kid)| kid.clone());
        let bound = jkt.is_some() && jkt == dpop_kid;
        let read_only =
            !token.scopes.is_empty() && token.scopes.iter().all(|s| s.ends_with(".read"));
        out!("client          {} (server {})", c.client, c.server);
        out!("token endpoint  {}", c.endpoint);
        out!("assertion key   {}", c.assertion_key);
        match &c.dpop_key {
            Some((k, _)) => out!("dpop key        {k}"),
            None => out!("dpop key        (none: dpop = \"off\")"),
        }
        out!("token_type      {}", token.token_type);
        out!(
            "dpop-bound      {}",
            match (&jkt, bound) {
                (Some(_), true) => "yes (cnf.jkt is the DPoP key's thumbprint)".to_string(),
                (Some(j), false) => format!("NO: cnf.jkt {j} is not the DPoP key's thumbprint"),
                (None, _) => "unknown (the token is not a JWT with cnf.jkt)".to_string(),
            }
        );
        out!("scopes granted  {scope}");
        out!(
            "scope guard     pass (allowed: {})",
            c.allowed_scopes.join(" ")
        );
        out!(
            "read-only       {}",
            if read_only {
                "yes (every scope is *.read)"
            } else {
                "no"
            }
        );
        out!(
            "expires_in      {}",
            token
                .expires_in
                .map_or("(not given)".into(), |s| format!("{s} s"))
        );
        out!(
            "round trips     {}{}",
            c.round_trips,
            match c.cached {
                Some(true) => " (when the agent fetched it; it came from the agent's cache)",
                Some(false) => " (fetched by the agent for this request)",
                None => "",
            }
        );
        let tolerated = i64::try_from(keybound::oauth::state::TOLERATED_SKEW_SECS).unwrap_or(0);
        out!(
            "clock offset    {}",
            match c.clock_offset {
                None => "(no Date header)".to_string(),
                Some(o) if o.abs() >= tolerated => format!(
                    "{o:+} s (server minus local): this machine's clock or the server's is off; keybound states iat/exp in the server's time"
                ),
                Some(o) => format!("{o:+} s (server minus local)"),
            }
        );
        return Ok(());
    }
    if as_json {
        let v = json!({
            "token_type": token.token_type,
            "expires_in": token.expires_in,
            "scope": scope,
            "cnf_jkt": jkt,
            "access_token": token.secret.expose_secret(),
        });
        out!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        out!("token_type    {}", token.token_type);
        out!(
            "expires_in    {}",
            token
                .expires_in
                .map_or("(not given)".into(), |s| s.to_string())
        );
        out!("scope         {scope}");
        out!("cnf.jkt       {}", jkt.as_deref().unwrap_or("(none)"));
        out!("access_token  {}", token.secret.expose_secret());
    }
    Ok(())
}

pub fn call(config: Option<&Path>, args: CallArgs) -> anyhow::Result<ExitCode> {
    let url = endpoint_url(&args.url).map_err(anyhow::Error::msg)?;
    let body = args.data.as_deref().map(read_data).transpose()?;
    let method = match (&args.method, &body) {
        (Some(m), _) => Method::from_bytes(m.to_ascii_uppercase().as_bytes())
            .with_context(|| format!("'{m}' is not an HTTP method"))?,
        (None, Some(_)) => Method::POST,
        (None, None) => Method::GET,
    };
    if args.paginate && method != Method::GET {
        anyhow::bail!("--paginate follows links of GET requests only");
    }
    let mut headers = Vec::new();
    for h in &args.headers {
        let (name, value) = h
            .split_once(':')
            .with_context(|| format!("header '{h}' is not 'Name: value'"))?;
        let name = HeaderName::from_bytes(name.trim().as_bytes())
            .with_context(|| format!("'{}' is not a header name", name.trim()))?;
        if name == http::header::AUTHORIZATION || name.as_str() == "dpop" {
            anyhow::bail!("header '{name}' is set by keybound; do not pass it with -H");
        }
        headers.push((
            name,
            HeaderValue::from_str(value.trim()).context("invalid header value")?,
        ));
    }
    let has_type = headers.iter().any(|(n, _)| n == http::header::CONTENT_TYPE);
    if let Some(b) = &body
        && !has_type
        && serde_json::from_slice::<serde_json::Value>(b).is_ok()
    {
        headers.push((
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        ));
    }
    let request = ApiRequest {
        method,
        url,
        headers,
        body,
    };
    let (loaded, agent) = setup(config, args.no_agent)?;
    let rt = runtime()?;
    let (items, response) = match agent {
        Some(agent) => {
            let name = client_name(loaded, args.client.as_deref())?;
            rt.block_on(call_via_agent(agent, &name, request, args.paginate))?
        }
        None => {
            let client = open_client(&loaded?, args.client.as_deref())?;
            if args.paginate {
                let (items, last) = rt.block_on(client.paginate(request))?;
                (Some(items), last)
            } else {
                (None, rt.block_on(client.call(&request))?)
            }
        }
    };
    match &items {
        Some(items) => {
            if response.status.is_success() {
                out!("{}", serde_json::to_string_pretty(items)?);
            }
        }
        None => {
            let mut stdout = std::io::stdout().lock();
            std::io::Write::write_all(&mut stdout, &response.body)?;
            if !response.body.ends_with(b"\n") && !response.body.is_empty() {
                std::io::Write::write_all(&mut stdout, b"\n")?;
            }
        }
    }
    tracing::info!(
        status = response.status.as_u16(),
        round_trips = response.round_trips,
        "call finished"
    );
    if response.status.as_u16() >= 400 {
        eprintln!("error: {}", response.error_line());
        return Ok(ExitCode::from(HTTP_ERROR));
    }
    Ok(ExitCode::SUCCESS)
}

/// The call made by the agent (`POST /v1/call`): the same response, the token never here.
async fn call_via_agent(
    agent: AgentSocket,
    client: &str,
    request: ApiRequest,
    paginate: bool,
) -> anyhow::Result<(Option<Vec<serde_json::Value>>, ApiResponse)> {
    let socket = agent.path().display().to_string();
    let headers: Vec<(String, String)> = request
        .headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let v = agent
        .post(
            "/v1/call",
            &json!({
                "client": client,
                "method": request.method.as_str(),
                "url": request.url.as_str(),
                "headers": headers,
                "body": request.body.as_ref().map(|b| STANDARD.encode(b)),
                "paginate": paginate,
            }),
        )
        .await?;
    let bad = |what: &str| anyhow::anyhow!("the agent at {socket} answered a call without {what}");
    let status = v["status"]
        .as_u64()
        .and_then(|s| u16::try_from(s).ok())
        .and_then(|s| http::StatusCode::from_u16(s).ok())
        .ok_or_else(|| bad("a valid status"))?;
    let mut map = http::HeaderMap::new();
    let pairs: Vec<(String, String)> =
        serde_json::from_value(v["headers"].clone()).map_err(|_| bad("headers"))?;
    for (k, val) in pairs {
        if let (Ok(k), Ok(val)) = (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(&val),
        ) {
            map.append(k, val);
        }
    }
    let body = match v["body"].as_str() {
        Some(b) => STANDARD.decode(b).map_err(|_| bad("a base64 body"))?,
        None => Vec::new(),
    };
    let items = match paginate {
        true => Some(
            serde_json::from_value::<Vec<serde_json::Value>>(v["items"].clone())
                .map_err(|_| bad("items"))?,
        ),
        false => None,
    };
    let response = ApiResponse {
        status,
        headers: map,
        body,
        round_trips: v["round_trips"]
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(0),
        clock_offset: v["clock_offset"].as_i64(),
    };
    Ok((items, response))
}

fn read_data(data: &str) -> anyhow::Result<Vec<u8>> {
    match data.strip_prefix('@') {
        Some("-") => {
            let mut b = Vec::new();
            std::io::stdin()
                .read_to_end(&mut b)
                .context("cannot read the body from stdin")?;
            Ok(b)
        }
        Some(path) => std::fs::read(PathBuf::from(path))
            .with_context(|| format!("cannot read body file {path}")),
        None => Ok(data.as_bytes().to_vec()),
    }
}

/// The claims of a JWT access token, decoded without verification (display only).
fn jwt_claims(token: &str) -> Option<serde_json::Value> {
    jose::decode(token).ok().map(|d| d.claims)
}
