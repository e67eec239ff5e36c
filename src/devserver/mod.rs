//! `keybound dev-server`: a strict Okta-like authorization and resource server for
//! development and tests. Not an authorization server for production.
