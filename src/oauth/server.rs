//! Authorization-server profiles: what differs between Okta, Auth0 and a generic RFC 7523
//! server — the assertion audience, its maximum lifetime, the algorithms accepted.

use serde::Deserialize;

use crate::jose::Alg;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ServerKind {
    /// Okta's org authorization server (`/oauth2/v1/token`), e.g. for the Management API.
    #[default]
    Okta,
    /// An Okta custom authorization server (`/oauth2/{id}/v1/token`).
    OktaCustom,
    Auth0,
    /// Any RFC 6749 + RFC 7523 + RFC 9449 server.
    Generic,
}

/// Whose URL an assertion's `aud` names by default.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AudienceRule {
    /// The token endpoint URL (Okta; RFC 7523 §3 item 3).
    TokenEndpoint,
    /// The issuer identifier (Auth0; rfc7523bis).
    Issuer,
}

impl ServerKind {
    pub fn name(self) -> &'static str {
        match self {
            ServerKind::Okta => "okta",
            ServerKind::OktaCustom => "okta-custom",
            ServerKind::Auth0 => "auth0",
            ServerKind::Generic => "generic",
        }
    }

    pub fn audience_rule(self) -> AudienceRule {
        match self {
            ServerKind::Auth0 => AudienceRule::Issuer,
            ServerKind::Okta | ServerKind::OktaCustom | ServerKind::Generic => {
                AudienceRule::TokenEndpoint
            }
        }
    }

    /// The longest `exp - iat` the server accepts for a client assertion.
    pub fn max_assertion_lifetime(self) -> u64 {
        match self {
            ServerKind::Auth0 => 300,
            ServerKind::Okta | ServerKind::OktaCustom | ServerKind::Generic => {
                super::assertion::MAX_LIFETIME_SECS
            }
        }
    }

    /// Client-assertion algorithms the server accepts, among those keybound signs.
    /// Okta: RS/ES 256/384/512, no PS256. Auth0: RS256, RS384, PS256.
    pub fn assertion_algs(self) -> &'static [Alg] {
        match self {
            ServerKind::Okta | ServerKind::OktaCustom => &[Alg::ES256, Alg::ES384, Alg::RS256],
            ServerKind::Auth0 => &[Alg::RS256, Alg::PS256],
            ServerKind::Generic => &Alg::ALL,
        }
    }

    /// Okta refuses a DPoP key that is also the client-authentication key.
    pub fn requires_distinct_keys(self) -> bool {
        matches!(self, ServerKind::Okta | ServerKind::OktaCustom)
    }
}
