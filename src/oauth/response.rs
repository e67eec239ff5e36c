//! Reading what servers answer: token responses (RFC 6749 §5.1), error bodies (§5.2) with
//! hints, Okta API errors, `WWW-Authenticate: DPoP` (RFC 9449 §7.1), `Link` (RFC 8288),
//! `Retry-After` and `Date` (RFC 9110).

use std::time::{Duration, SystemTime};

use http::HeaderMap;
use serde::Deserialize;

/// RFC 6749 §5.1.
#[derive(Debug, Deserialize)]
pub struct TokenResponse {
    pub access_token: String,
    pub token_type: String,
    pub expires_in: Option<u64>,
    pub scope: Option<String>,
}

/// Why `body`, a success answer of a token endpoint, is not a [`TokenResponse`] (`error`,
/// serde's), in words that quote none of its values: the body may hold the access token,
/// and this text goes to logs and to callers that may not see the token. The members'
/// names and JSON types are said, and what RFC 6749 §5.1 wants instead.
pub fn token_response_problem(
    body: &[u8],
    headers: &HeaderMap,
    error: &serde_json::Error,
) -> String {
    use serde_json::Value;
    let kind = |v: &Value| match v {
        Value::Null => "null",
        Value::Bool(_) => "true or false",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    };
    let value: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => {
            let media = headers
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map_or("none".to_owned(), |t| {
                    format!("'{}'", t.chars().take(60).collect::<String>())
                });
            return format!(
                "it is not JSON ({:?} error at line {} column {}; {} bytes, Content-Type {media}); \
                 the endpoint must answer application/json",
                e.classify(),
                e.line(),
                e.column(),
                body.len(),
            );
        }
    };
    let Value::Object(members) = &value else {
        return format!("it is {}, not a JSON object", kind(&value));
    };
    let mut problems = Vec::new();
    for (name, wanted, required) in [
        ("access_token", "a string", true),
        ("token_type", "a string", true),
        ("expires_in", "a whole number of seconds", false),
        ("scope", "a string", false),
    ] {
        let fits = |v: &Value| match name {
            "expires_in" => v.as_u64().is_some(),
            _ => v.is_string(),
        };
        match members.get(name) {
            None if required => problems.push(format!("{name} is missing")),
            Some(Value::Null) if required => problems.push(format!("{name} is null")),
            None | Some(Value::Null) => {}
            Some(v) if fits(v) => {}
            Some(v) => problems.push(format!("{name} is {}, not {wanted}", kind(v))),
        }
    }
    if problems.is_empty() {
        // Not a member's type: a duplicate member (serde names it, a name of ours), or
        // else serde's category and place only.
        let said = error.to_string();
        problems.push(
            said.strip_prefix("duplicate field `")
                .and_then(|rest| rest.split_once('`'))
                .map_or_else(
                    || {
                        format!(
                            "{:?} error at line {} column {}",
                            error.classify(),
                            error.line(),
                            error.column()
                        )
                    },
                    |(name, _)| format!("{name} is given twice"),
                ),
        );
    }
    let names: Vec<String> = members
        .keys()
        .take(12)
        .map(|k| k.chars().take(40).collect())
        .collect();
    let more = if members.len() > names.len() {
        ", …"
    } else {
        ""
    };
    format!(
        "{} (its members: {}{more})",
        problems.join("; "),
        names.join(", ")
    )
}

/// RFC 6749 §5.2.
#[derive(Clone, Debug, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    pub error_description: Option<String>,
}

/// Okta's API error shape.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OktaError {
    pub error_code: String,
    pub error_summary: String,
    #[serde(default)]
    pub error_causes: Vec<OktaCause>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OktaCause {
    pub error_summary: String,
}

/// The parameters of a `WWW-Authenticate: DPoP …` challenge.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Challenge {
    pub scheme: String,
    pub error: Option<String>,
    pub error_description: Option<String>,
}

/// What to tell a user about a §5.2 error code.
pub fn hint(error: &str) -> &'static str {
    match error {
        "invalid_client" => {
            "the server did not accept the client assertion: check that the key's kid is registered (paste `keybound jwks` into the app), that client_id is right, and that the assertion audience is the token endpoint URL"
        }
        "invalid_dpop_proof" => {
            "the server rejected the DPoP proof: check htu (the exact token endpoint URL), htm, and the clock (iat)"
        }
        "use_dpop_nonce" => "the server demanded a DPoP nonce again right after one was supplied",
        "invalid_scope" => {
            "a requested scope is not granted to this app: grant it in the server's console, or remove it from scopes"
        }
        "insufficient_scope" => {
            "the token lacks a scope the API needs: grant the scope to the app (Okta: Okta API Scopes tab), and for admin APIs give the app an admin role"
        }
        "unauthorized_client" => {
            "the app may not use this grant type: enable Client Credentials for it"
        }
        "invalid_grant" => "the grant was refused",
        "unsupported_grant_type" => "the server does not support client_credentials for this app",
        "invalid_token" => {
            "the access token was rejected (expired, revoked, or presented with the wrong scheme)"
        }
        _ => "",
    }
}

/// Parses every `WWW-Authenticate` challenge with the DPoP or Bearer scheme, several in
/// one header value included (RFC 9110 §11.6.1).
pub fn challenges(headers: &HeaderMap) -> Vec<Challenge> {
    let mut out = Vec::new();
    for value in headers.get_all(http::header::WWW_AUTHENTICATE) {
        let Ok(value) = value.to_str() else { continue };
        let mut current: Option<Challenge> = None;
        for element in split_outside(value, ',') {
            let element = element.trim();
            let param = match scheme_of(element) {
                Some((scheme, rest)) => {
                    out.extend(current.take());
                    let known = ["dpop", "bearer"].contains(&scheme.to_ascii_lowercase().as_str());
                    current = known.then(|| Challenge {
                        scheme: scheme.into(),
                        ..Challenge::default()
                    });
                    rest
                }
                None => element,
            };
            let (Some(c), Some((name, value))) = (current.as_mut(), auth_param(param)) else {
                continue;
            };
            match name.to_ascii_lowercase().as_str() {
                "error" => c.error = Some(value),
                "error_description" => c.error_description = Some(value),
                _ => {}
            }
        }
        out.extend(current);
    }
    out
}

/// `scheme [params]` when a list element starts a challenge: a token that is not a
/// parameter's name (no `=` follows it).
fn scheme_of(element: &str) -> Option<(&str, &str)> {
    let end = element
        .find(|c: char| c.is_whitespace() || c == '=')
        .unwrap_or(element.len());
    let (scheme, rest) = element.split_at(end);
    if scheme.is_empty() || rest.trim_start().starts_with('=') {
        return None;
    }
    Some((scheme, rest.trim_start()))
}

/// `name=value` or `name="quoted \"value\""` (RFC 9110 §5.6.4, §11.2), unquoted.
fn auth_param(s: &str) -> Option<(String, String)> {
    let (name, value) = s.split_once('=')?;
    let (name, value) = (name.trim(), value.trim());
    if name.is_empty() {
        return None;
    }
    Some((name.to_string(), unquote(value)))
}

/// A quoted-string's content with its escapes undone; a token as it is.
fn unquote(value: &str) -> String {
    let Some(inner) = value.strip_prefix('"') else {
        return value.to_string();
    };
    let mut out = String::new();
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.extend(chars.next()),
            '"' => break,
            c => out.push(c),
        }
    }
    out
}

/// Splits on `sep` where it is not inside a quoted string (RFC 9110 §5.6.4) or a `<…>`
/// URI reference (RFC 8288 §3): a comma in a link target or a quoted parameter is data.
pub fn split_outside(value: &str, sep: char) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut start, mut quoted, mut bracketed, mut escaped) = (0, false, false, false);
    for (i, c) in value.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' if !bracketed => quoted = !quoted,
            '<' if !quoted => bracketed = true,
            '>' if !quoted => bracketed = false,
            c if c == sep && !quoted && !bracketed => {
                out.push(&value[start..i]);
                start = i + c.len_utf8();
            }
            _ => {}
        }
    }
    out.push(&value[start..]);
    out
}

/// The `rel="next"` target among all `Link` headers (RFC 8288 §3: `rel` may list several
/// relation types, compared case-insensitively).
pub fn next_link(headers: &HeaderMap) -> Option<String> {
    for value in headers.get_all(http::header::LINK) {
        let Ok(value) = value.to_str() else { continue };
        for link in split_outside(value, ',') {
            let mut parts = split_outside(link, ';').into_iter();
            let Some(target) = parts.next() else { continue };
            let is_next = parts.filter_map(auth_param).any(|(name, value)| {
                name.eq_ignore_ascii_case("rel")
                    && value
                        .split_ascii_whitespace()
                        .any(|r| r.eq_ignore_ascii_case("next"))
            });
            if is_next {
                return target
                    .trim()
                    .strip_prefix('<')
                    .and_then(|t| t.strip_suffix('>'))
                    .map(str::to_string);
            }
        }
    }
    None
}

/// `Retry-After`: delay-seconds or an HTTP-date.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let v = headers
        .get(http::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate::parse_http_date(v).ok()?;
    Some(when.duration_since(SystemTime::now()).unwrap_or_default())
}

/// The server's clock from `Date`, as seconds since the epoch.
pub fn server_time(headers: &HeaderMap) -> Option<u64> {
    let v = headers.get(http::header::DATE)?.to_str().ok()?;
    let t = httpdate::parse_http_date(v).ok()?;
    t.duration_since(SystemTime::UNIX_EPOCH)
        .ok()
        .map(|d| d.as_secs())
}

/// A body for an error message: UTF-8, at most 300 characters.
pub fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    match text.char_indices().nth(300) {
        Some((i, _)) => format!("{}…", &text[..i]),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    /// What a success answer that does not parse says: its shape, never a value (an
    /// opaque token here, as a 200 with `expires_in` as a string carries it).
    #[test]
    fn an_unreadable_token_response_is_described_without_its_values() {
        let problem = |body: &str, media: Option<&str>| {
            let mut h = HeaderMap::new();
            if let Some(m) = media {
                h.insert("content-type", HeaderValue::from_str(m).unwrap());
            }
            let e = serde_json::from_str::<TokenResponse>(body).unwrap_err();
            token_response_problem(body.as_bytes(), &h, &e)
        };
        let secret = "opaque-abc123";
        let p = problem(
            &format!(r#"{{"access_token":"{secret}","token_type":"DPoP","expires_in":"3600"}}"#),
            Some("application/json"),
        );
        assert!(!p.contains(secret) && !p.contains("3600"), "{p}");
        assert!(
            p.contains("expires_in is a string, not a whole number of seconds"),
            "{p}"
        );
        assert!(
            p.contains("its members: access_token, token_type, expires_in"),
            "{p}"
        );
        let p = problem(&format!(r#"{{"accessToken":"{secret}"}}"#), None);
        assert!(!p.contains(secret), "{p}");
        assert!(
            p.contains("access_token is missing; token_type is missing"),
            "{p}"
        );
        for body in [
            format!("access_token={secret}&token_type=bearer"),
            format!(r#"["{secret}"]"#),
            format!(r#"{{"access_token":"{secret}","access_token":"{secret}","token_type":"x"}}"#),
            format!(r#"{{"access_token":"{secret}","token_type":"DPoP","expires_in":1.5}}"#),
        ] {
            let p = problem(&body, Some("text/plain"));
            assert!(!p.contains(secret), "{p}");
        }
        let p = problem(
            r#"{"access_token":"a","access_token":"b","token_type":"x"}"#,
            None,
        );
        assert!(p.starts_with("access_token is given twice"), "{p}");
    }

    #[test]
    fn dpop_challenges() {
        let mut h = HeaderMap::new();
        h.append(
            "www-authenticate",
            HeaderValue::from_static(
                r#"DPoP error="use_dpop_nonce", error_description="Resource server requires nonce in DPoP proof""#,
            ),
        );
        let c = challenges(&h);
        assert_eq!(c[0].error.as_deref(), Some("use_dpop_nonce"));
        assert_eq!(
            c[0].error_description.as_deref(),
            Some("Resource server requires nonce in DPoP proof")
        );
        let mut h = HeaderMap::new();
        h.append(
            "www-authenticate",
            HeaderValue::from_static(r#"DPoP algs="ES256 PS256""#),
        );
        assert_eq!(challenges(&h)[0].error, None);
    }

    #[test]
    fn okta_links() {
        let mut h = HeaderMap::new();
        h.append(
            "link",
            HeaderValue::from_static(r#"<https://o.example/api/v1/users?limit=2>; rel="self""#),
        );
        h.append(
            "link",
            HeaderValue::from_static(
                r#"<https://o.example/api/v1/users?after=00u2&limit=2>; rel="next""#,
            ),
        );
        assert_eq!(
            next_link(&h).as_deref(),
            Some("https://o.example/api/v1/users?after=00u2&limit=2")
        );
        let mut h = HeaderMap::new();
        h.append(
            "link",
            HeaderValue::from_static(
                r#"<https://o.example/a>; rel="self", <https://o.example/b>; rel="next""#,
            ),
        );
        assert_eq!(next_link(&h).as_deref(), Some("https://o.example/b"));
    }

    /// A comma inside a quoted string or a `<…>` target is part of its element (RFC 9110
    /// §5.6.1, RFC 8288 §3), and `rel` may list several relation types.
    #[test]
    fn links_with_commas_in_targets_and_quoted_params() {
        let mut h = HeaderMap::new();
        h.append(
            "link",
            HeaderValue::from_static(
                r#"<https://o.example/a?x=1,2>; rel="self", <https://o.example/b?x=3,4>; title="page, next"; rel="next""#,
            ),
        );
        assert_eq!(next_link(&h).as_deref(), Some("https://o.example/b?x=3,4"));
        let mut h = HeaderMap::new();
        h.append(
            "link",
            HeaderValue::from_static(r#"<https://o.example/c>; title="x;rel=next", <https://o.example/d>; rel="prev next""#),
        );
        assert_eq!(next_link(&h).as_deref(), Some("https://o.example/d"));
    }

    /// Several challenges in one `WWW-Authenticate` value (RFC 9110 §11.6.1), quoted
    /// commas in their parameters.
    #[test]
    fn several_challenges_in_one_header() {
        let mut h = HeaderMap::new();
        h.append(
            "www-authenticate",
            HeaderValue::from_static(
                r#"Bearer realm="api, v1", DPoP algs="ES256", error="use_dpop_nonce", error_description="nonce, please""#,
            ),
        );
        let c = challenges(&h);
        assert_eq!(c.len(), 2, "{c:?}");
        assert_eq!(c[0].scheme, "Bearer");
        assert_eq!(c[0].error, None);
        assert_eq!(c[1].scheme, "DPoP");
        assert_eq!(c[1].error.as_deref(), Some("use_dpop_nonce"));
        assert_eq!(c[1].error_description.as_deref(), Some("nonce, please"));
    }

    #[test]
    fn retry_after_forms() {
        let mut h = HeaderMap::new();
        h.insert("retry-after", HeaderValue::from_static("3"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(3)));
        h.insert(
            "retry-after",
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(retry_after(&h), Some(Duration::ZERO));
    }
}
