//! Who may ask: `[[agent.allow]]` rules matched against the caller's peer credentials
//! (SO_PEERCRED: uid, gid, pid of the connecting process). Rules are parsed into types when
//! the config loads ("parse, don't validate"), and a [`Caller`] — the only way a handler
//! reaches a rule — exists only for a connection whose peer a rule names.
//!
//! Over 400 lines with its tests: the rules, their parsing and the extractor are one
//! security check.

use std::fmt;
use std::sync::Arc;

use serde::Deserialize;
use url::Url;

use super::gateway::route::safe_path;
use crate::oauth::assertion::MAX_LIFETIME_SECS;

/// The connecting process, from the socket's peer credentials. Built only from an accepted
/// stream ([`Peer::of`]): a handler, which has no stream, cannot make one up, and so cannot
/// make up a [`Caller`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    uid: u32,
    gid: u32,
    pid: Option<i32>,
}

impl Peer {
    /// The kernel's record of who connected (SO_PEERCRED).
    pub fn of(stream: &tokio::net::UnixStream) -> std::io::Result<Peer> {
        let c = stream.peer_cred()?;
        Ok(Peer {
            uid: c.uid(),
            gid: c.gid(),
            pid: c.pid(),
        })
    }

    /// The owner of the other end of a loopback TCP connection, the identd way: the
    /// kernel's TCP table (`/proc/net/tcp`) holds the client's socket, whose local address
    /// is the connection's peer and whose remote address is ours, with the uid that owns
    /// it. Only an established IPv4 loopback connection counts (a closing socket's entry
    /// no longer says who owned it). A TCP peer has no gid the kernel vouches for, so only
    /// uid rules match it ([`TCP_NO_GID`]), and no pid.
    pub fn of_tcp(stream: &tokio::net::TcpStream) -> std::io::Result<Peer> {
        let (peer, local) = (stream.peer_addr()?, stream.local_addr()?);
        let table = std::fs::read_to_string("/proc/net/tcp")?;
        Peer::from_tcp_table(&table, peer, local)
    }

    fn from_tcp_table(
        table: &str,
        peer: std::net::SocketAddr,
        local: std::net::SocketAddr,
    ) -> std::io::Result<Peer> {
        use std::net::SocketAddr::V4;
        let refuse = |why: String| std::io::Error::new(std::io::ErrorKind::PermissionDenied, why);
        let (V4(peer), V4(local)) = (peer, local) else {
            return Err(refuse(format!(
                "{peer}: only IPv4 loopback connections are served"
            )));
        };
        if !peer.ip().is_loopback() {
            return Err(refuse(format!("{peer} is not a loopback address")));
        }
        // The kernel prints each address as the native-endian value of its network-order
        // bytes, and the port in host order.
        let hex = |a: std::net::SocketAddrV4| {
            format!(
                "{:08X}:{:04X}",
                u32::from_ne_bytes(a.ip().octets()),
                a.port()
            )
        };
        let (theirs, ours) = (hex(peer), hex(local));
        for line in table.lines().skip(1) {
            // sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid ...
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() > 7
                && f[1].eq_ignore_ascii_case(&theirs)
                && f[2].eq_ignore_ascii_case(&ours)
                // 01: ESTABLISHED.
                && f[3] == "01"
            {
                let uid = f[7]
                    .parse()
                    .map_err(|_| refuse(format!("unreadable uid '{}' in /proc/net/tcp", f[7])))?;
                return Ok(Peer {
                    uid,
                    gid: TCP_NO_GID,
                    pid: None,
                });
            }
        }
        Err(refuse(format!(
            "no established socket {peer} -> {local} in /proc/net/tcp: its owner is unknown"
        )))
    }

    pub fn uid(&self) -> u32 {
        self.uid
    }

    pub fn gid(&self) -> u32 {
        self.gid
    }

    pub fn pid(&self) -> Option<i32> {
        self.pid
    }
}

/// The gid of a TCP peer: none the kernel vouches for. `(gid_t)-1` is no group, and a rule
/// cannot name it (`gid` rules are checked against it and never match).
pub const TCP_NO_GID: u32 = u32::MAX;

/// One `[[agent.allow]]` entry, parsed. A field left out places no limit on that dimension.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, try_from = "RawRule")]
pub struct Rule {
    uid: Option<u32>,
    gid: Option<u32>,
    clients: Allow,
    keys: Allow,
    htu_prefixes: Option<Vec<HtuPrefix>>,
    max_assertion_lifetime: Option<Lifetime>,
    /// Gateway routes (`[[route]]`) by name; `None`: the routes of the clients it allows.
    routes: Option<Allow>,
}

/// The rule as written; [`Rule`] is built from it only when it names a uid or a gid.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    uid: Option<u32>,
    gid: Option<u32>,
    clients: Option<Allow>,
    keys: Option<Allow>,
    htu_prefixes: Option<Vec<HtuPrefix>>,
    max_assertion_lifetime: Option<Lifetime>,
    routes: Option<Allow>,
}

impl TryFrom<RawRule> for Rule {
    type Error = String;

    fn try_from(r: RawRule) -> Result<Rule, String> {
        if r.uid.is_none() && r.gid.is_none() {
            return Err("set uid or gid: a rule must say whom it allows".into());
        }
        // A rule that names routes is a gateway rule: the clients and keys it leaves out
        // are none, so a caller allowed a route never gets its client's token or keys.
        let unnamed = || match r.routes {
            Some(_) => Allow::Only(Vec::new()),
            None => Allow::Any,
        };
        Ok(Rule {
            uid: r.uid,
            gid: r.gid,
            clients: r.clients.unwrap_or_else(unnamed),
            keys: r.keys.unwrap_or_else(unnamed),
            htu_prefixes: r.htu_prefixes,
            max_assertion_lifetime: r.max_assertion_lifetime,
            routes: r.routes,
        })
    }
}

/// A list of names, or `"*"` (or no list) for any name.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(from = "Vec<String>")]
pub enum Allow {
    #[default]
    Any,
    Only(Vec<String>),
}

impl From<Vec<String>> for Allow {
    fn from(names: Vec<String>) -> Allow {
        if names.iter().any(|n| n == "*") {
            Allow::Any
        } else {
            Allow::Only(names)
        }
    }
}

impl Allow {
    fn check(&self, name: &str, what: &str) -> Result<(), String> {
        match self {
            Allow::Only(l) if !l.iter().any(|x| x == name) => Err(format!(
                "{what} '{name}' is not allowed for this caller (allowed: {})",
                l.join(", ")
            )),
            _ => Ok(()),
        }
    }
}

/// `max_assertion_lifetime`: 1 s up to the longest lifetime keybound signs.
#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(try_from = "u64")]
pub struct Lifetime(u64);

impl TryFrom<u64> for Lifetime {
    type Error = String;

    fn try_from(secs: u64) -> Result<Lifetime, String> {
        if (1..=MAX_LIFETIME_SECS).contains(&secs) {
            Ok(Lifetime(secs))
        } else {
            Err(format!(
                "{secs} is out of range 1 to {MAX_LIFETIME_SECS} (seconds)"
            ))
        }
    }
}

/// One `htu_prefixes` entry: an origin (scheme, host, port), matched exactly, and a path
/// prefix, matched on `/` segment boundaries. `https://o.example/api` allows
/// `https://o.example/api` and `https://o.example/api/users`, not `/apix`,
/// `https://o.example.evil.example/` or `https://o.example:8443/api`.
#[derive(Clone, Debug, Deserialize)]
#[serde(try_from = "String")]
pub struct HtuPrefix {
    /// As written in the config, for messages.
    text: String,
    scheme: String,
    host: String,
    port: u16,
    /// The path without its trailing `/`; empty for the whole origin.
    path: String,
}

impl TryFrom<String> for HtuPrefix {
    type Error = String;

    fn try_from(text: String) -> Result<HtuPrefix, String> {
        let example = "write an origin and an optional path, e.g. \"https://api.example.com/v1/\"";
        let url = Url::parse(&text)
            .map_err(|e| format!("'{text}' is not an absolute URL ({e}); {example}"))?;
        if !matches!(url.scheme(), "https" | "http") {
            return Err(format!(
                "'{text}': the scheme must be https or http; {example}"
            ));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(format!(
                "'{text}': a user name or password has no place in an htu prefix; {example}"
            ));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(format!(
                "'{text}': an htu has no query or fragment (RFC 9449 §4.2); {example}"
            ));
        }
        let (Some(host), Some(port)) = (url.host_str(), url.port_or_known_default()) else {
            return Err(format!("'{text}' has no host; {example}"));
        };
        Ok(HtuPrefix {
            scheme: url.scheme().to_owned(),
            host: host.to_owned(),
            port,
            path: url.path().trim_end_matches('/').to_owned(),
            text,
        })
    }
}

impl HtuPrefix {
    fn matches(&self, htu: &Url) -> bool {
        let path = htu.path();
        htu.scheme() == self.scheme
            && htu.host_str() == Some(self.host.as_str())
            && htu.port_or_known_default() == Some(self.port)
            && (path == self.path
                || path
                    .strip_prefix(self.path.as_str())
                    .is_some_and(|rest| rest.starts_with('/')))
    }
}

impl fmt::Display for HtuPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// The rules in force: the configured ones, or "the agent's own uid, unrestricted".
#[derive(Clone, Debug)]
pub struct Policy {
    rules: Vec<Arc<Rule>>,
    own_uid: u32,
}

impl Policy {
    /// A rule naming a client that is not configured is a typo that would refuse that
    /// client forever: refused at start, named.
    pub fn check_clients(
        rules: &[Rule],
        configured: &[&str],
    ) -> Result<(), crate::error::InvalidSetting> {
        check_names(rules, configured, "clients", "client", |r| Some(&r.clients))
    }

    /// A rule naming a route that is not configured: refused at start, named.
    pub fn check_routes(
        rules: &[Rule],
        configured: &[&str],
    ) -> Result<(), crate::error::InvalidSetting> {
        check_names(rules, configured, "routes", "route", |r| r.routes.as_ref())
    }

    pub fn new(rules: Vec<Rule>, own_uid: u32) -> Policy {
        let rules = if rules.is_empty() {
            vec![Rule {
                uid: Some(own_uid),
                ..Rule::default()
            }]
        } else {
            rules
        };
        Policy {
            rules: rules.into_iter().map(Arc::new).collect(),
            own_uid,
        }
    }

    /// The caller, when a rule names it: the first rule naming its uid, else the first
    /// naming its gid (and no uid).
    pub fn caller(&self, peer: Peer) -> Result<Caller, NotAllowed> {
        self.rules
            .iter()
            .find(|r| r.uid == Some(peer.uid))
            .or_else(|| {
                self.rules.iter().find(|r| {
                    r.uid.is_none() && peer.gid != TCP_NO_GID && r.gid == Some(peer.gid)
                })
            })
            .map(|rule| Caller {
                peer,
                rule: rule.clone(),
            })
            .ok_or_else(|| {
                NotAllowed(format!(
                    "uid {} (gid {}) is not allowed to use this agent; add an [[agent.allow]] rule (without rules only uid {} may)",
                    peer.uid, peer.gid, self.own_uid
                ))
            })
    }
}

/// Every name the rules list in `field` (`list` reads it) is one of `configured` (the
/// `[[table]]` entries' names).
fn check_names(
    rules: &[Rule],
    configured: &[&str],
    field: &str,
    table: &str,
    list: impl Fn(&Rule) -> Option<&Allow>,
) -> Result<(), crate::error::InvalidSetting> {
    for (i, rule) in rules.iter().enumerate() {
        let Some(Allow::Only(names)) = list(rule) else {
            continue;
        };
        for (j, name) in names.iter().enumerate() {
            if !configured.contains(&name.as_str()) {
                return Err(crate::error::InvalidSetting::new(
                    format!("agent.allow[{i}].{field}[{j}]"),
                    format!(
                        "no [[{table}]] is named '{name}' (configured: {})",
                        if configured.is_empty() {
                            "none".to_owned()
                        } else {
                            configured.join(", ")
                        }
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// What a caller's rule does not allow, in words the caller can act on (the agent answers
/// it as 403, or closes the connection of a peer no rule names).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct NotAllowed(String);

impl NotAllowed {
    pub fn kind(&self) -> crate::error::ErrorKind {
        crate::error::ErrorKind::Refused
    }
}

impl From<NotAllowed> for String {
    fn from(e: NotAllowed) -> String {
        e.0
    }
}

/// A connected process and the rule that allows it. Built only by [`Policy::caller`]; the
/// agent's handlers get it from the request (an extractor), and every path to a key or a
/// client goes through its checks.
#[derive(Clone, Debug)]
pub struct Caller {
    peer: Peer,
    rule: Arc<Rule>,
}

impl Caller {
    pub fn peer(&self) -> Peer {
        self.peer
    }

    pub fn check_client(&self, name: &str) -> Result<(), NotAllowed> {
        self.rule.clients.check(name, "client").map_err(NotAllowed)
    }

    pub fn check_key(&self, name: &str) -> Result<(), NotAllowed> {
        self.rule.keys.check(name, "key").map_err(NotAllowed)
    }

    /// A gateway route, whose token is `client`'s, signed with `keys` (the client's
    /// assertion and DPoP keys): named in the rule's `routes`, or, when the rule names
    /// none, allowed exactly when the token is (the client and its keys: a caller that may
    /// have the token may send what the route sends), and never under `htu_prefixes`,
    /// which the route's requests are not checked against.
    pub fn check_route(&self, name: &str, client: &str, keys: &[&str]) -> Result<(), NotAllowed> {
        if let Some(routes) = &self.rule.routes {
            return routes.check(name, "route").map_err(NotAllowed);
        }
        let named = |NotAllowed(m)| {
            NotAllowed(format!(
                "route '{name}' sends with {m}; name the route in the rule's routes"
            ))
        };
        self.check_client(client).map_err(named)?;
        for key in keys {
            self.check_key(key).map_err(named)?;
        }
        if self.rule.htu_prefixes.is_some() {
            return Err(NotAllowed(format!(
                "route '{name}' is not named in this rule's routes, and the rule limits \
                 htu_prefixes; name the route in the rule's routes"
            )));
        }
        Ok(())
    }

    /// `htu` as `dpop::htu` normalised it.
    pub fn check_htu(&self, htu: &str) -> Result<(), NotAllowed> {
        let Some(prefixes) = &self.rule.htu_prefixes else {
            return Ok(());
        };
        let list = || {
            let all: Vec<String> = prefixes.iter().map(ToString::to_string).collect();
            all.join(", ")
        };
        let parsed = Url::parse(htu).ok();
        // Matched by segments, so a path a server could resolve otherwise than its
        // segments read is refused, as the gateway refuses it: `url` resolves `.`/`..`
        // (`%2e` too) but keeps `..;x`, which servers that cut path parameters at `;`
        // take for `..`, and an encoded `/` (`/api/..%2fadmin`) that one decoding server
        // sees as two segments.
        if let Some(url) = &parsed {
            if let Err(why) = safe_path(url.path()) {
                return Err(NotAllowed(format!(
                    "htu '{htu}' is refused under this caller's htu_prefixes ({}): {why}",
                    list()
                )));
            }
            if prefixes.iter().any(|p| p.matches(url)) {
                return Ok(());
            }
        }
        Err(NotAllowed(format!(
            "htu '{htu}' is outside this caller's htu_prefixes ({})",
            list()
        )))
    }

    /// The longest assertion lifetime this caller may ask for, when its rule sets one.
    pub fn max_assertion_lifetime(&self) -> Option<u64> {
        self.rule.max_assertion_lifetime.map(|l| l.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(uid: u32, gid: u32) -> Peer {
        Peer {
            uid,
            gid,
            pid: None,
        }
    }

    fn rule(toml_text: &str) -> Result<Rule, String> {
        toml::from_str(toml_text).map_err(|e| e.to_string())
    }

    #[test]
    fn default_is_own_uid_only() {
        let p = Policy::new(vec![], 1000);
        assert!(p.caller(peer(1000, 5)).is_ok());
        assert!(
            p.caller(peer(65534, 65534))
                .unwrap_err()
                .to_string()
                .contains("65534")
        );
    }

    #[test]
    fn rules_limit_clients_keys_and_htu() {
        let r =
            rule("gid = 50\nkeys = [\"dpop\"]\nhtu_prefixes = [\"https://o.example/\"]").unwrap();
        let caller = Policy::new(vec![r], 0).caller(peer(7, 50)).unwrap();
        assert!(caller.check_key("dpop").is_ok());
        assert!(caller.check_key("client-auth").is_err());
        assert!(caller.check_client("any").is_ok());
        assert!(caller.check_htu("https://o.example/api").is_ok());
        assert!(caller.check_htu("https://evil.example/").is_err());
        assert!(
            rule("keys = [\"dpop\"]")
                .unwrap_err()
                .contains("set uid or gid")
        );
    }

    #[test]
    fn a_rule_naming_routes_gets_no_client_or_key_it_does_not_name() {
        let gw = Policy::new(vec![rule("uid = 7\nroutes = [\"okta\"]").unwrap()], 0)
            .caller(peer(7, 7))
            .unwrap();
        assert!(gw.check_route("okta", "okta", &["client-auth"]).is_ok());
        assert!(gw.check_route("other", "okta", &[]).is_err());
        assert!(gw.check_client("okta").is_err());
        assert!(gw.check_key("dpop").is_err());
        // Without routes: the routes of the clients the rule allows.
        let c = Policy::new(vec![rule("uid = 8\nclients = [\"okta\"]").unwrap()], 0)
            .caller(peer(8, 8))
            .unwrap();
        assert!(c.check_route("okta", "okta", &["client-auth"]).is_ok());
        assert!(c.check_route("gh", "github", &[]).is_err());
    }

    #[test]
    fn a_route_the_rule_does_not_name_needs_what_the_token_needs() {
        // The client, but not its assertion key: no token, so no route either.
        let keyless = Policy::new(
            vec![rule("uid = 8\nclients = [\"okta\"]\nkeys = [\"dpop\"]").unwrap()],
            0,
        )
        .caller(peer(8, 8))
        .unwrap();
        assert!(keyless.check_route("okta", "okta", &["dpop"]).is_ok());
        let e = keyless
            .check_route("okta", "okta", &["client-auth", "dpop"])
            .unwrap_err();
        assert!(String::from(e).contains("client-auth"));
        // htu_prefixes limit proofs; a route's requests are not checked against them.
        let limited = Policy::new(
            vec![rule("uid = 8\nhtu_prefixes = [\"https://o.example/api/v1/users\"]").unwrap()],
            0,
        )
        .caller(peer(8, 8))
        .unwrap();
        let e = limited
            .check_route("okta", "okta", &["client-auth"])
            .unwrap_err();
        assert!(String::from(e).contains("htu_prefixes"));
        // Named in routes: allowed, whatever else the rule says.
        let named = Policy::new(
            vec![
                rule("uid = 8\nroutes = [\"okta\"]\nhtu_prefixes = [\"https://o.example/\"]")
                    .unwrap(),
            ],
            0,
        )
        .caller(peer(8, 8))
        .unwrap();
        assert!(named.check_route("okta", "okta", &["client-auth"]).is_ok());
    }

    #[test]
    fn a_tcp_peer_is_the_owner_of_the_established_client_socket() {
        // 127.0.0.1:40000 -> 127.0.0.1:8080 owned by uid 1001, the server's own end, and
        // a closing (TIME_WAIT, uid 0) entry of another connection.
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 1 1
   1: 0100007F:9C40 0100007F:1F90 01 00000000:00000000 00:00000000 00000000  1001        0 2 1
   2: 0100007F:1F90 0100007F:9C40 01 00000000:00000000 00:00000000 00000000  1000        0 3 1
   3: 0100007F:9C41 0100007F:1F90 06 00000000:00000000 03:00000000 00000000     0        0 0 3
";
        let addr = |s: &str| s.parse::<std::net::SocketAddr>().unwrap();
        let local = addr("127.0.0.1:8080");
        let p = Peer::from_tcp_table(table, addr("127.0.0.1:40000"), local).unwrap();
        assert_eq!((p.uid, p.gid, p.pid), (1001, TCP_NO_GID, None));
        // Closing: its owner is no longer known; not root.
        assert!(Peer::from_tcp_table(table, addr("127.0.0.1:40001"), local).is_err());
        assert!(Peer::from_tcp_table(table, addr("10.0.0.1:40000"), local).is_err());
        // gid rules never match a TCP peer.
        let by_gid = Policy::new(vec![rule(&format!("gid = {TCP_NO_GID}")).unwrap()], 0);
        assert!(by_gid.caller(p).is_err());
    }

    #[test]
    fn htu_prefixes_match_the_origin_exactly_and_the_path_by_segments() {
        let r = rule(
            "uid = 1\nhtu_prefixes = [\"https://example.okta.com\", \"https://o.example/api/\"]",
        )
        .unwrap();
        let caller = Policy::new(vec![r], 0).caller(peer(1, 1)).unwrap();
        for ok in [
            "https://example.okta.com/",
            "https://example.okta.com/oauth2/v1/token",
            "https://o.example/api",
            "https://o.example/api/",
            "https://o.example/api/users",
        ] {
            assert!(caller.check_htu(ok).is_ok(), "{ok}");
        }
        for refused in [
            "https://example.okta.com.evil.com/oauth2/v1/token",
            "https://example.okta.com:8443/oauth2/v1/token",
            "http://example.okta.com/",
            "https://o.example/apix",
            "https://o.example/",
            "https://evil@o.example.evil/api",
            "not a url",
            // Path parameters on a dot segment, which `url` keeps and servers that cut
            // them at `;` resolve (`/api/..;/admin` is `/admin` to Tomcat or Jetty).
            "https://o.example/api/..;/admin",
            "https://o.example/api/%2e%2e;/admin",
            "https://o.example/api/..;x/admin",
            "https://o.example/api/.%2E%3Bx/admin",
            // An encoded separator, and an empty segment.
            "https://o.example/api/..%2fadmin",
            "https://o.example/api/%5C..%5Cadmin",
            "https://o.example/api//admin",
        ] {
            assert!(caller.check_htu(refused).is_err(), "{refused}");
        }
    }

    #[test]
    fn bad_rules_are_refused_when_parsed() {
        for (text, needle) in [
            (
                "uid = 1\nhtu_prefixes = [\"o.example/api\"]",
                "not an absolute URL",
            ),
            (
                "uid = 1\nhtu_prefixes = [\"ftp://o.example/\"]",
                "https or http",
            ),
            (
                "uid = 1\nhtu_prefixes = [\"https://o.example/?q\"]",
                "no query",
            ),
            (
                "uid = 1\nhtu_prefixes = [\"https://u:p@o.example/\"]",
                "user name",
            ),
            ("uid = 1\nmax_assertion_lifetime = 0", "out of range"),
            ("uid = 1\nmax_assertion_lifetime = 3601", "out of range"),
        ] {
            let e = rule(text).unwrap_err();
            assert!(e.contains(needle), "{text}: {e}");
        }
    }
}
