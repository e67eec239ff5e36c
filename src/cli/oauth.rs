//! `token` and `call`: keybound's main job, on a small tokio runtime.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use http::{HeaderName, HeaderValue, Method};
use keybound::config::Config;
use keybound::jose;
use keybound::keyring::Keyring;
use keybound::oauth::api::ApiRequest;
use keybound::oauth::client::OAuthClient;
use keybound::oauth::settings::{endpoint_url, origin};
use secrecy::ExposeSecret as _;
use serde_json::json;

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
    /// The URL to call
    url: String,
}

fn open_client(config: Option<&Path>, name: Option<&str>) -> anyhow::Result<OAuthClient> {
    let (config, _) = Config::load(config)?;
    let settings = config.client(name).map_err(anyhow::Error::msg)?.clone();
    let keyring = Keyring::open(&config.token, config.policy.clone(), None)?;
    Ok(OAuthClient::new(settings, &keyring)?)
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

pub fn token(
    config: Option<&Path>,
    client: Option<&str>,
    as_json: bool,
    check: bool,
) -> anyhow::Result<ExitCode> {
    let client = open_client(config, client)?;
    let rt = runtime()?;
    let token = rt.block_on(client.token())?;
    let jkt = jwt_claims(token.secret.expose_secret())
        .and_then(|c| c["cnf"]["jkt"].as_str().map(str::to_string));
    let dpop_kid = client.dpop_key().map(|k| k.kid().to_string());
    let bound = jkt.is_some() && jkt == dpop_kid;
    let scope = token.scopes.join(" ");
    if check {
        let c = client.config();
        let endpoint = rt.block_on(client.endpoint())?.clone();
        let read_only =
            !token.scopes.is_empty() && token.scopes.iter().all(|s| s.ends_with(".read"));
        let key = |k: &keybound::keyring::SigningKey| {
            format!("'{}' {} kid {}", k.label(), k.alg(), k.kid())
        };
        out!("client          {} (server {})", c.name, c.server.name());
        out!("token endpoint  {endpoint}");
        out!("assertion key   {}", key(&client.assertion_key()));
        match client.dpop_key() {
            Some(k) => out!("dpop key        {}", key(&k)),
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
        out!("round trips     {}", token.round_trips);
        let offset = client.state().offset(&origin(&endpoint));
        let tolerated = i64::try_from(keybound::oauth::state::TOLERATED_SKEW_SECS).unwrap_or(0);
        out!(
            "clock offset    {}",
            match offset {
                None => "(no Date header)".to_string(),
                Some(o) if o.abs() >= tolerated => format!(
                    "{o:+} s (server minus local): this machine's clock or the server's is off; keybound states iat/exp in the server's time"
                ),
                Some(o) => format!("{o:+} s (server minus local)"),
            }
        );
        return Ok(ExitCode::SUCCESS);
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
    Ok(ExitCode::SUCCESS)
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
    let client = open_client(config, args.client.as_deref())?;
    let rt = runtime()?;
    let response = if args.paginate {
        let (items, last) = rt.block_on(client.paginate(request))?;
        if last.status.is_success() {
            out!("{}", serde_json::to_string_pretty(&items)?);
        }
        last
    } else {
        let r = rt.block_on(client.call(&request))?;
        let mut stdout = std::io::stdout().lock();
        std::io::Write::write_all(&mut stdout, &r.body)?;
        if !r.body.ends_with(b"\n") && !r.body.is_empty() {
            std::io::Write::write_all(&mut stdout, b"\n")?;
        }
        r
    };
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
