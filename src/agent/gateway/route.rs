//! `[[route]]`: parsed when the config loads into a [`Route`] whose allow-list is a typed
//! matcher ([`Pattern`]); the request path made safe before it is matched ([`safe_path`]);
//! `Link` targets on the upstream rewritten to the gateway ([`rewrite_links`]).

use std::time::Duration;

use http::Method;
use serde::Deserialize;
use url::Url;

use crate::oauth::response::split_outside;
use crate::oauth::settings::{ClientConfig, origin};

/// `[[route]]` as written (see keybound.example.toml).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSettings {
    pub name: String,
    pub client: String,
    pub upstream: String,
    pub allow: Vec<String>,
    pub timeout_secs: Option<u64>,
    pub max_body_bytes: Option<usize>,
}

/// A route, checked against the clients: served at `/gw/<name>/`, sent with `client`'s
/// token to `upstream` (an origin of the client's `api_origins`, and a base path).
#[derive(Clone, Debug)]
pub struct Route {
    pub name: String,
    pub client: String,
    /// `scheme://host[:port]`.
    pub origin: String,
    /// The upstream's base path without its trailing `/`; empty for none.
    pub base_path: String,
    pub allow: Vec<Pattern>,
    /// Default: the client's `timeout_secs`.
    pub timeout: Option<Duration>,
    /// Default: `agent.max_body_bytes`.
    pub max_body_bytes: Option<usize>,
}

impl RouteSettings {
    /// `at` is the key for messages (`route[0]`).
    pub fn validate(self, at: &str, clients: &[ClientConfig]) -> Result<Route, String> {
        let name = &self.name;
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        {
            return Err(format!(
                "{at}.name: '{name}' is not a path-safe name; use a-z, 0-9, '-' and '_'"
            ));
        }
        let Some(client) = clients.iter().find(|c| c.name == self.client) else {
            let names: Vec<&str> = clients.iter().map(|c| c.name.as_str()).collect();
            return Err(format!(
                "{at}.client: no [[client]] is named '{}' (configured: {})",
                self.client,
                if names.is_empty() {
                    "none".to_owned()
                } else {
                    names.join(", ")
                }
            ));
        };
        let url = Url::parse(&self.upstream).map_err(|e| {
            format!(
                "{at}.upstream: '{}' is not an absolute URL ({e}); write e.g. \"https://example.okta.com\"",
                self.upstream
            )
        })?;
        if !matches!(url.scheme(), "https" | "http")
            || url.host_str().is_none()
            || !url.username().is_empty()
            || url.password().is_some()
            || url.query().is_some()
            || url.fragment().is_some()
        {
            return Err(format!(
                "{at}.upstream: '{}' must be an http(s) origin with an optional base path, \
                 without user, query or fragment",
                self.upstream
            ));
        }
        let upstream_origin = origin(&url);
        if !client.api_origins.contains(&upstream_origin) {
            return Err(format!(
                "{at}.upstream: the origin {upstream_origin} is not one of client '{}''s \
                 api_origins ({}); add it to that client's api_origins, or send this route \
                 with another client",
                client.name,
                client.api_origins.join(", ")
            ));
        }
        if self.allow.is_empty() {
            return Err(format!(
                "{at}.allow: empty; list what the route may send, e.g. [\"GET /api/v1/users\"]"
            ));
        }
        let allow = self
            .allow
            .iter()
            .map(|p| Pattern::parse(p).map_err(|e| format!("{at}.allow: route '{name}': {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(t) = self.timeout_secs
            && !(1..=300).contains(&t)
        {
            return Err(format!("{at}.timeout_secs: {t} is out of range 1 to 300"));
        }
        if let Some(b) = self.max_body_bytes
            && !(1..=16 << 20).contains(&b)
        {
            return Err(format!(
                "{at}.max_body_bytes: {b} is out of range 1 to {}",
                16 << 20
            ));
        }
        Ok(Route {
            name: self.name,
            client: self.client,
            origin: upstream_origin,
            base_path: url.path().trim_end_matches('/').to_owned(),
            allow,
            timeout: self.timeout_secs.map(Duration::from_secs),
            max_body_bytes: self.max_body_bytes,
        })
    }
}

impl Route {
    /// Does the allow-list let `method` reach `path` (a [`safe_path`])?
    pub fn allows(&self, method: &Method, path: &str) -> bool {
        let segments: Vec<&str> = path.split('/').skip(1).collect();
        self.allow.iter().any(|p| p.matches(method, &segments))
    }

    /// The upstream URL for a safe path and the query as the caller sent it.
    pub fn upstream_url(&self, path: &str, query: Option<&str>) -> Result<Url, String> {
        let mut text = format!("{}{}{path}", self.origin, self.base_path);
        if let Some(q) = query {
            text.push('?');
            text.push_str(q);
        }
        Url::parse(&text).map_err(|e| format!("cannot build the upstream URL: {e}"))
    }

    /// The allow-list as written, for messages.
    pub fn allow_list(&self) -> String {
        let list: Vec<&str> = self.allow.iter().map(|p| p.text.as_str()).collect();
        list.join(", ")
    }
}

/// One allow-list entry: a method and a path of segments, `*` for exactly one non-empty
/// segment, a trailing `**` for any remainder. HEAD is allowed wherever GET is.
#[derive(Clone, Debug)]
pub struct Pattern {
    text: String,
    method: Method,
    segments: Vec<Segment>,
    /// Ends in `/**`.
    rest: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Segment {
    Literal(String),
    One,
}

impl Pattern {
    pub fn parse(text: &str) -> Result<Pattern, String> {
        let example = "write a method and a path, e.g. \"GET /api/v1/users/*\"";
        let bad = |why: &str| format!("pattern '{text}': {why}; {example}");
        let (method, path) = text
            .split_once(' ')
            .ok_or_else(|| bad("no method and path"))?;
        if method == "*" {
            return Err(bad(
                "method '*' is not allowed: write each method out (HEAD comes with GET)",
            ));
        }
        if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(bad("the method must be an upper-case HTTP method"));
        }
        let method = Method::from_bytes(method.as_bytes()).map_err(|_| bad("not a method"))?;
        if method == Method::TRACE || method == Method::CONNECT {
            return Err(bad(
                "TRACE and CONNECT are not allowed through the gateway (TRACE would echo \
                 the agent's Authorization and DPoP back to the application)",
            ));
        }
        let path = path.trim();
        if !path.starts_with('/') {
            return Err(bad("the path must start with '/'"));
        }
        let mut segments = Vec::new();
        let mut rest = false;
        let parts: Vec<&str> = path.split('/').skip(1).collect();
        for (i, seg) in parts.iter().enumerate() {
            let last = i + 1 == parts.len();
            match *seg {
                "**" if last => rest = true,
                "**" => return Err(bad("'**' may only end the path")),
                "*" => segments.push(Segment::One),
                "" if last && i == 0 => {}
                "" => return Err(bad("empty segment ('//' or a trailing '/')")),
                "." | ".." => return Err(bad("dot segments are not allowed")),
                s if s.contains('*') => {
                    return Err(bad("'*' must be a whole segment (or '**' at the end)"));
                }
                s => {
                    let normal = normalise_segment(s).map_err(|e| bad(&e))?;
                    if dot_like(&normal) {
                        return Err(bad("dot segments are not allowed"));
                    }
                    segments.push(Segment::Literal(normal));
                }
            }
        }
        Ok(Pattern {
            text: text.to_owned(),
            method,
            segments,
            rest,
        })
    }

    fn matches(&self, method: &Method, path: &[&str]) -> bool {
        let method_ok =
            *method == self.method || (*method == Method::HEAD && self.method == Method::GET);
        if !method_ok {
            return false;
        }
        // "/" is one empty segment; a pattern "/" has none.
        let path: &[&str] = if path == [""] { &[] } else { path };
        if path.len() < self.segments.len() || (!self.rest && path.len() != self.segments.len()) {
            return false;
        }
        self.segments.iter().zip(path).all(|(s, p)| match s {
            Segment::One => !p.is_empty(),
            Segment::Literal(l) => l == p,
        })
    }
}

/// The path after `/gw/<route>` (and an htu's path under a rule's `htu_prefixes`), made
/// safe to match and to send, or why it is refused:
/// dot segments (`.`, `..`, percent-encoded too, and with path parameters: `..;x`, which
/// servers that split at `;` resolve), segments empty before a `;`, encoded `/` or `\`
/// (`%2F`, `%5C`), empty segments (`//`; one trailing `/` is kept), an encoded NUL, bytes
/// that do not decode to UTF-8 (`%C0%AE`) and bad percent-encoding are refused, never
/// resolved, so what is matched is what the upstream gets. Percent-encoded unreserved
/// characters are decoded and other escapes upper-cased (RFC 3986 §6.2.2), so `%75sers`
/// matches `users`.
pub fn safe_path(raw: &str) -> Result<String, String> {
    if raw.is_empty() || raw == "/" {
        return Ok("/".to_owned());
    }
    let Some(rest) = raw.strip_prefix('/') else {
        return Err("the path must start with '/'".to_owned());
    };
    let parts: Vec<&str> = rest.split('/').collect();
    let mut out = String::with_capacity(raw.len());
    for (i, seg) in parts.iter().enumerate() {
        out.push('/');
        if seg.is_empty() {
            if i + 1 == parts.len() {
                continue;
            }
            return Err("empty path segment ('//')".to_owned());
        }
        let normal = normalise_segment(seg)?;
        if dot_like(&normal) {
            return Err(format!("dot segment '{seg}' in the path"));
        }
        out.push_str(&normal);
    }
    Ok(out)
}

/// Is this (normalised) segment a dot segment, or empty, once what a server may take as
/// path parameters (from the first `;`, encoded or not) is cut off?
fn dot_like(normal: &str) -> bool {
    let before = match normal.find(';') {
        Some(i) => &normal[..i],
        None => normal,
    };
    let before = match before.find("%3B") {
        Some(i) => &before[..i],
        None => before,
    };
    matches!(before, "" | "." | "..")
}

/// One segment with unreserved characters decoded and other escapes upper-cased; an
/// encoded `/`, `\` or NUL, a raw `\`, an escape without two hex digits and bytes that
/// do not decode to UTF-8 are refused.
fn normalise_segment(seg: &str) -> Result<String, String> {
    let bytes = seg.as_bytes();
    let mut out = String::with_capacity(seg.len());
    // The segment fully decoded, to check that it is UTF-8.
    let mut decoded = Vec::with_capacity(seg.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| {
                        format!(
                            "bad percent-encoding in '{seg}' ('%' must be followed by two hex digits)"
                        )
                    })?;
                match hex {
                    b'/' | b'\\' => {
                        return Err(format!("encoded '/' or '\\' in the path segment '{seg}'"));
                    }
                    0 => return Err(format!("encoded NUL (%00) in the path segment '{seg}'")),
                    c if c.is_ascii_alphanumeric() || b"-._~".contains(&c) => {
                        out.push(char::from(c));
                    }
                    c => out.push_str(&format!("%{c:02X}")),
                }
                decoded.push(hex);
                i += 3;
            }
            b'\\' => return Err(format!("'\\' in the path segment '{seg}'")),
            _ => {
                let ch = seg[i..].chars().next().unwrap_or('\u{fffd}');
                out.push(ch);
                let mut buf = [0u8; 4];
                decoded.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
                i += ch.len_utf8().max(1);
            }
        }
    }
    if std::str::from_utf8(&decoded).is_err() {
        return Err(format!(
            "the path segment '{seg}' does not decode to UTF-8 (an overlong or broken escape)"
        ));
    }
    Ok(out)
}

/// `Link` header values with targets on the route's upstream (same origin, under its base
/// path) rewritten to `/gw/<route>/...`, relation and parameters kept; every other target
/// is dropped (cross-origin, or outside the base path). `base` resolves relative targets.
/// `None` when no link is left.
pub fn rewrite_links(route: &Route, base: &Url, values: &[&str]) -> Option<String> {
    let mut kept = Vec::new();
    for value in values {
        for link in split_outside(value, ',') {
            let link = link.trim();
            if link.is_empty() {
                continue;
            }
            let Some(end) = link.find('>') else { continue };
            let Some(target) = link[..end].trim().strip_prefix('<') else {
                continue;
            };
            let params = &link[end + 1..];
            let Ok(url) = base.join(target) else { continue };
            if origin(&url) != route.origin {
                continue;
            }
            let path = url.path();
            let Some(below) = path.strip_prefix(route.base_path.as_str()) else {
                continue;
            };
            if !(below.is_empty() || below.starts_with('/')) {
                continue;
            }
            let below = if below.is_empty() { "/" } else { below };
            let mut gw = format!("/gw/{}{below}", route.name);
            if let Some(q) = url.query() {
                gw.push('?');
                gw.push_str(q);
            }
            kept.push(format!("<{gw}>{params}"));
        }
    }
    (!kept.is_empty()).then(|| kept.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client() -> ClientConfig {
        let text = "name = \"okta\"\nissuer = \"https://example.okta.com\"\nclient_id = \"0oa1\"\nassertion_key = \"client-auth\"\ndpop_key = \"dpop\"\n";
        let s: crate::oauth::settings::ClientSettings = toml::from_str(text).unwrap();
        s.validate("client[0]").unwrap()
    }

    fn route(upstream: &str, allow: &[&str]) -> Route {
        let client = client();
        RouteSettings {
            name: "okta".into(),
            client: "okta".into(),
            upstream: upstream.into(),
            allow: allow.iter().map(|s| s.to_string()).collect(),
            timeout_secs: None,
            max_body_bytes: None,
        }
        .validate("route[0]", &[client])
        .unwrap()
    }

    /// The commented `[[route]]` of keybound.example.toml, uncommented, is a valid route
    /// naming every setting.
    #[test]
    fn the_example_config_documents_every_setting() {
        let example = include_str!("../../../keybound.example.toml");
        let (_, section) = example
            .split_once("\n# [[route]]\n")
            .expect("a [[route]] section");
        let section = section.split("\n\n").next().unwrap_or_default();
        let lines: Vec<&str> = section
            .lines()
            .filter_map(|l| l.strip_prefix("# "))
            .filter(|l| l.split_once(" = ").is_some_and(|(k, _)| !k.contains(' ')))
            .collect();
        let settings: RouteSettings = toml::from_str(&lines.join("\n")).unwrap();
        let r = settings.validate("route[0]", &[client()]).unwrap();
        assert!(r.allows(&Method::HEAD, "/api/v1/users/00u1"));
        assert!(r.timeout.is_some() && r.max_body_bytes.is_some());
        assert_eq!(lines.len(), 6, "{lines:?}");
    }

    #[test]
    fn patterns_match_segments_and_head_comes_with_get() {
        let r = route(
            "https://example.okta.com",
            &[
                "GET /api/v1/users",
                "GET /api/v1/users/*",
                "POST /api/v1/groups/**",
            ],
        );
        for (m, p) in [
            ("GET", "/api/v1/users"),
            ("HEAD", "/api/v1/users"),
            ("GET", "/api/v1/users/00u1"),
            ("POST", "/api/v1/groups"),
            ("POST", "/api/v1/groups/a/b"),
        ] {
            assert!(
                r.allows(&Method::from_bytes(m.as_bytes()).unwrap(), p),
                "{m} {p}"
            );
        }
        for (m, p) in [
            ("POST", "/api/v1/users"),
            ("DELETE", "/api/v1/users/00u1"),
            ("GET", "/api/v1/users/00u1/roles"),
            ("GET", "/api/v1/users/"),
            ("GET", "/api/v1/usersx"),
            ("GET", "/api/v1"),
            ("HEAD", "/api/v1/groups"),
        ] {
            assert!(
                !r.allows(&Method::from_bytes(m.as_bytes()).unwrap(), p),
                "{m} {p}"
            );
        }
    }

    #[test]
    fn bad_patterns_are_refused_naming_the_route_and_pattern() {
        let client = client();
        for (pattern, needle) in [
            ("* /api", "method '*'"),
            ("get /api", "upper-case"),
            ("GET api", "start with '/'"),
            ("GET /api/**/x", "may only end"),
            ("GET /api/us*", "whole segment"),
            ("GET /api//x", "empty segment"),
            ("GET /api/../x", "dot segment"),
            ("GET /api/%2e%2e/x", "dot segment"),
            ("GET /api/..;/x", "dot segment"),
            ("TRACE /api", "TRACE and CONNECT"),
            ("CONNECT /api", "TRACE and CONNECT"),
            ("GET /api/%00/x", "NUL"),
            ("GET", "no method and path"),
        ] {
            let e = RouteSettings {
                name: "okta".into(),
                client: "okta".into(),
                upstream: "https://example.okta.com".into(),
                allow: vec![pattern.into()],
                timeout_secs: None,
                max_body_bytes: None,
            }
            .validate("route[0]", std::slice::from_ref(&client))
            .unwrap_err();
            assert!(
                e.contains(needle) && e.contains("'okta'") && e.contains(pattern),
                "{pattern}: {e}"
            );
        }
        let e = RouteSettings {
            name: "okta".into(),
            client: "okta".into(),
            upstream: "https://evil.example".into(),
            allow: vec!["GET /".into()],
            timeout_secs: None,
            max_body_bytes: None,
        }
        .validate("route[0]", std::slice::from_ref(&client))
        .unwrap_err();
        assert!(e.contains("api_origins"), "{e}");
    }

    #[test]
    fn unsafe_paths_are_refused_before_matching() {
        for bad in [
            "/api/../admin",
            "/api/./users",
            "/api/%2e%2e/admin",
            "/api/%2E/users",
            "/api/.%2e/admin",
            "/api/users%2fadmin",
            "/api/users%2Fadmin",
            "/api/users%5cadmin",
            "/api//users",
            "/api/%zz",
            "/api/a\\b",
        ] {
            assert!(safe_path(bad).is_err(), "{bad}");
        }
        // What a server that splits path parameters at ';' (Tomcat, Jetty, Spring) would
        // resolve as a dot segment; NUL; an overlong UTF-8 '.'; escapes without two hex
        // digits.
        for bad in [
            "/api/..;/admin",
            "/api/.;x/users",
            "/api/%2e%2e;/admin",
            "/api/..%3B/admin",
            "/api/;x/users",
            "/api/..;a;b/admin",
            "/api/a%00b",
            "/api/%C0%AE%C0%AE/admin",
            "/api/%e2%82",
            "/api/%+5",
            "/api/%-1x",
            "/api/%5",
        ] {
            assert!(safe_path(bad).is_err(), "{bad}");
        }
        assert_eq!(safe_path("/api/a;v=1").unwrap(), "/api/a;v=1");
        assert_eq!(
            safe_path("/api/%C3%A9t%C3%A9").unwrap(),
            "/api/%C3%A9t%C3%A9"
        );
        assert_eq!(safe_path("/api/v1/%75sers").unwrap(), "/api/v1/users");
        assert_eq!(safe_path("/a/b%3ac/").unwrap(), "/a/b%3Ac/");
        assert_eq!(safe_path("").unwrap(), "/");
    }

    #[test]
    fn links_on_the_upstream_are_rewritten_and_others_dropped() {
        let r = route("https://example.okta.com/base", &["GET /**"]);
        let base = Url::parse("https://example.okta.com/base/api/v1/users?limit=2").unwrap();
        let out = rewrite_links(
            &r,
            &base,
            &[
                "<https://example.okta.com/base/api/v1/users?after=x&limit=2>; rel=\"next\"",
                "<https://evil.example/base/api>; rel=\"prev\", </other/x>; rel=\"self\", <users?a=1>; rel=\"first\"",
            ],
        )
        .unwrap();
        assert_eq!(
            out,
            "</gw/okta/api/v1/users?after=x&limit=2>; rel=\"next\", </gw/okta/api/v1/users?a=1>; rel=\"first\""
        );
        assert!(rewrite_links(&r, &base, &["<https://evil.example/>; rel=\"next\""]).is_none());
    }
}
