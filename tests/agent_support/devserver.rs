//! The dev-server (`keybound-devserver`) in-process on 127.0.0.1:0 ([`DevServer`]), and the
//! `[[client]]` the agent tests point at it ([`dev_client`]).

use std::path::Path;

use crate::support::DevToken;

/// The dev-server (`keybound-devserver`) on 127.0.0.1:0, on a thread and runtime of its
/// own; stopped on drop.
pub struct DevServer {
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    _server: keybound_devserver::Background,
}

impl DevServer {
    /// A dev-server that knows the client `client_id` by the JWKS file `jwks`.
    pub fn start(client_id: &str, jwks: &Path) -> DevServer {
        DevServer::start_with(client_id, jwks, |_| {})
    }

    /// `start` with settings changed by `adjust` (a clock offset).
    pub fn start_with(
        client_id: &str,
        jwks: &Path,
        adjust: impl FnOnce(&mut keybound_devserver::Settings),
    ) -> DevServer {
        let mut settings = keybound_devserver::Settings::new(
            client_id,
            keybound_devserver::JwksSource::File(jwks.to_owned()),
        );
        adjust(&mut settings);
        let server = keybound_devserver::Background::start(0, settings)
            .unwrap_or_else(|e| panic!("the dev-server did not start: {e}"));
        DevServer {
            base: server.base().to_owned(),
            _server: server,
        }
    }
}

impl DevServer {
    /// Every request the dev-server was sent so far.
    pub fn requests(&self) -> Vec<keybound_devserver::SeenRequest> {
        self._server.requests()
    }

    /// A dev-server that knows [`DEV_CLIENT_ID`] by the token's `client-auth` key (its
    /// JWKS as `keybound jwks` prints it), with settings changed by `adjust`.
    pub fn for_client_auth(
        token: &DevToken,
        adjust: impl FnOnce(&mut keybound_devserver::Settings),
    ) -> DevServer {
        let jwks_file = token.write_file(
            "client-jwks.json",
            &serde_json::json!({ "keys": token.jwks(&["client-auth"]) }).to_string(),
        );
        DevServer::start_with(DEV_CLIENT_ID, &jwks_file, adjust)
    }
}

pub const DEV_CLIENT_ID: &str = "0oa-agent-dev";

pub fn dev_client(base: &str) -> String {
    format!(
        r#"
[[client]]
name = "dev"
server = "okta"
token_endpoint = "{base}/oauth2/v1/token"
client_id = "{DEV_CLIENT_ID}"
assertion_key = "client-auth"
dpop_key = "dpop"
scopes = ["okta.users.read"]
allowed_scopes = ["okta.users.read"]
"#
    )
}
