//! The routes table: which local port, or which tunnel, serves which domain.
//!
//! The worker holds the live table and applies UDP commands (and the supervisor's tunnel
//! commands) to it; it reports every [`RouteChange`] to the supervisor, which applies the same
//! change to its copy and persists it. One type, one `apply`, so both copies change by the same
//! rule.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::command::Command;
use crate::domain::{Domain, DomainError};
use crate::tunnel::{TokenHash, TunnelRoute, MAX_TOKENS_PER_DOMAIN};

/// What serves a domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// A local app on this port of 127.0.0.1.
    Port(u16),
    /// Agents connected with one of these tokens (none: `tunnel revoke` took them all; the
    /// domain stays routed, its certificate kept, and is answered 503 until the next `allow`).
    Tunnel { tokens: Vec<TokenHash> },
}

impl Route {
    /// A tunnel route as read from a file or from another instance, which `apply` did not
    /// check: a token listed twice counts once; more than [`MAX_TOKENS_PER_DOMAIN`] is refused
    /// (the worker could not even be handed them).
    pub fn tunnel(mut tokens: Vec<TokenHash>) -> Result<Route, String> {
        let mut seen = std::collections::HashSet::new();
        tokens.retain(|token| seen.insert(*token));
        if tokens.len() > MAX_TOKENS_PER_DOMAIN {
            return Err(format!(
                "{} tokens for one domain, more than the {MAX_TOKENS_PER_DOMAIN} allowed",
                tokens.len()
            ));
        }
        Ok(Route::Tunnel { tokens })
    }
}

/// Where a request for a domain goes (a [`Route`] without the secrets).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Port(u16),
    Tunnel,
}

/// One change to the table, as reported from worker to supervisor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RouteChange {
    /// `add`: the domain is served by a local port (a tunnel route and its tokens are gone).
    Set { domain: Domain, port: u16 },
    /// `remove`: the domain is not routed (whatever it was).
    Remove { domain: Domain },
    /// `tunnel allow`: the domain is a tunnel (replacing a port route), and `token` may connect.
    AllowTunnel { domain: Domain, token: TokenHash },
    /// `tunnel revoke`: no token may connect to the domain any more.
    RevokeTunnel { domain: Domain },
}

impl RouteChange {
    pub fn domain(&self) -> &Domain {
        match self {
            RouteChange::Set { domain, .. }
            | RouteChange::Remove { domain }
            | RouteChange::AllowTunnel { domain, .. }
            | RouteChange::RevokeTunnel { domain } => domain,
        }
    }
}

impl From<Command> for RouteChange {
    fn from(command: Command) -> Self {
        match command {
            Command::Add { domain, port } => RouteChange::Set { domain, port },
            Command::Remove { domain } => RouteChange::Remove { domain },
        }
    }
}

/// Why a change could not be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("no route for {0}")]
    NoSuchRoute(Domain),
    #[error("{0} is not a tunnel (it is served by a local port)")]
    NotATunnel(Domain),
    #[error("{0} already has {MAX_TOKENS_PER_DOMAIN} tokens, the most a domain may have; revoke them and allow again")]
    TooManyTokens(Domain),
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Routes(BTreeMap<Domain, Route>);

impl Routes {
    /// Applies `change`. Returns whether the table is now different.
    pub fn apply(&mut self, change: &RouteChange) -> Result<bool, RouteError> {
        match change {
            RouteChange::Set { domain, port } => {
                let new = Route::Port(*port);
                Ok(self.0.insert(domain.clone(), new.clone()) != Some(new))
            }
            RouteChange::Remove { domain } => match self.0.remove(domain) {
                Some(_) => Ok(true),
                None => Err(RouteError::NoSuchRoute(domain.clone())),
            },
            RouteChange::AllowTunnel { domain, token } => match self.0.get_mut(domain) {
                Some(Route::Tunnel { tokens }) if tokens.contains(token) => Ok(false),
                Some(Route::Tunnel { tokens }) if tokens.len() >= MAX_TOKENS_PER_DOMAIN => {
                    Err(RouteError::TooManyTokens(domain.clone()))
                }
                Some(Route::Tunnel { tokens }) => {
                    tokens.push(*token);
                    Ok(true)
                }
                Some(Route::Port(_)) | None => {
                    let tokens = vec![*token];
                    self.0.insert(domain.clone(), Route::Tunnel { tokens });
                    Ok(true)
                }
            },
            RouteChange::RevokeTunnel { domain } => match self.0.get_mut(domain) {
                Some(Route::Tunnel { tokens }) => {
                    let had = !tokens.is_empty();
                    tokens.clear();
                    Ok(had)
                }
                Some(Route::Port(_)) => Err(RouteError::NotATunnel(domain.clone())),
                None => Err(RouteError::NoSuchRoute(domain.clone())),
            },
        }
    }

    pub fn get(&self, domain: &Domain) -> Option<&Route> {
        self.0.get(domain)
    }

    pub fn target(&self, domain: &Domain) -> Option<Target> {
        self.0.get(domain).map(|route| match route {
            Route::Port(port) => Target::Port(*port),
            Route::Tunnel { .. } => Target::Tunnel,
        })
    }

    pub fn is_routed(&self, domain: &Domain) -> bool {
        self.0.contains_key(domain)
    }

    /// The tokens that may connect to `domain`'s tunnel (empty if it is not a tunnel).
    pub fn tokens(&self, domain: &Domain) -> &[TokenHash] {
        match self.0.get(domain) {
            Some(Route::Tunnel { tokens }) => tokens,
            _ => &[],
        }
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&Domain, &Route)> {
        self.0.iter()
    }

    /// Whether any route is a tunnel.
    pub fn has_tunnels(&self) -> bool {
        self.0.values().any(|r| matches!(r, Route::Tunnel { .. }))
    }

    /// The port routes in pieces of at most `size`, for messages of bounded size.
    pub fn port_chunks(&self, size: usize) -> Vec<Vec<(Domain, u16)>> {
        let all: Vec<_> = (self.0.iter())
            .filter_map(|(d, r)| match r {
                Route::Port(p) => Some((d.clone(), *p)),
                Route::Tunnel { .. } => None,
            })
            .collect();
        all.chunks(size).map(<[_]>::to_vec).collect()
    }

    /// The tunnel routes in pieces of at most `size`.
    pub fn tunnel_chunks(&self, size: usize) -> Vec<Vec<TunnelRoute>> {
        let all: Vec<_> = (self.0.iter())
            .filter_map(|(d, r)| match r {
                Route::Tunnel { tokens } => Some(TunnelRoute {
                    name: d.to_string(),
                    tokens: tokens.clone(),
                }),
                Route::Port(_) => None,
            })
            .collect();
        all.chunks(size).map(<[_]>::to_vec).collect()
    }

    /// Adds (or replaces) one route.
    pub fn insert(&mut self, domain: Domain, route: Route) {
        self.0.insert(domain, route);
    }
}

impl FromIterator<(Domain, u16)> for Routes {
    fn from_iter<I: IntoIterator<Item = (Domain, u16)>>(iter: I) -> Self {
        Routes(iter.into_iter().map(|(d, p)| (d, Route::Port(p))).collect())
    }
}

impl FromIterator<(Domain, Route)> for Routes {
    fn from_iter<I: IntoIterator<Item = (Domain, Route)>>(iter: I) -> Self {
        Routes(iter.into_iter().collect())
    }
}

/// Routes as an older core-server kept them (its routes file, or the routes it hands over on
/// a rerun), whose rules for names may have been looser: the names this version refuses (a
/// name a browser reads as an IP address, say) are left out, each with the reason; the others
/// are kept. A route this version refuses could never be served anyway.
pub fn keep_routable<T>(entries: impl IntoIterator<Item = (String, T)>) -> Routable<T> {
    let mut routable = Routable::default();
    for (name, route) in entries {
        match Domain::parse(&name) {
            Ok(domain) => routable.kept.push((domain, route)),
            Err(why) => routable.refused.push((name, why)),
        }
    }
    routable
}

/// What [`keep_routable`] kept, and what it left out (each name with why).
///
/// Also how routes travel on a takeover: the wire format of `Vec<(Domain, u16)>` (the kept
/// ones), read with [`keep_routable`]'s leniency, so an older instance handing over a name
/// this version refuses does not fail the takeover.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routable<T = u16> {
    pub kept: Vec<(Domain, T)>,
    pub refused: Vec<(String, DomainError)>,
}

impl<T> Default for Routable<T> {
    fn default() -> Self {
        Routable {
            kept: Vec::new(),
            refused: Vec::new(),
        }
    }
}

impl From<Vec<(Domain, u16)>> for Routable {
    fn from(kept: Vec<(Domain, u16)>) -> Self {
        Routable {
            kept,
            refused: Vec::new(),
        }
    }
}

impl Serialize for Routable {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.kept.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Routable {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(keep_routable(Vec::<(String, u16)>::deserialize(
            deserializer,
        )?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_overwrites_and_remove_needs_a_route() {
        let d = Domain::parse("example.com").unwrap();
        let mut routes = Routes::default();
        assert_eq!(
            routes.apply(&RouteChange::Set {
                domain: d.clone(),
                port: 1
            }),
            Ok(true)
        );
        assert_eq!(
            routes.apply(&RouteChange::Set {
                domain: d.clone(),
                port: 1
            }),
            Ok(false)
        );
        assert_eq!(
            routes.apply(&RouteChange::Set {
                domain: d.clone(),
                port: 2
            }),
            Ok(true)
        );
        assert_eq!(routes.target(&d), Some(Target::Port(2)));
        assert_eq!(
            routes.apply(&RouteChange::Remove { domain: d.clone() }),
            Ok(true)
        );
        assert_eq!(
            routes.apply(&RouteChange::Remove { domain: d.clone() }),
            Err(RouteError::NoSuchRoute(d))
        );
        assert!(routes.is_empty());
    }

    #[test]
    fn tunnels_gather_tokens_and_add_or_remove_replaces_them() {
        let d = Domain::parse("app.example").unwrap();
        let [t1, t2] = [1, 2].map(|b| TokenHash([b; 32]));
        let allow = |token| RouteChange::AllowTunnel {
            domain: d.clone(),
            token,
        };
        let revoke = RouteChange::RevokeTunnel { domain: d.clone() };
        let mut routes = Routes::default();
        assert_eq!(
            routes.apply(&revoke),
            Err(RouteError::NoSuchRoute(d.clone()))
        );
        routes
            .apply(&RouteChange::Set {
                domain: d.clone(),
                port: 1,
            })
            .unwrap();
        assert_eq!(
            routes.apply(&revoke),
            Err(RouteError::NotATunnel(d.clone()))
        );
        assert_eq!(routes.apply(&allow(t1)), Ok(true));
        assert_eq!(routes.target(&d), Some(Target::Tunnel));
        assert_eq!(routes.apply(&allow(t1)), Ok(false));
        assert_eq!(routes.apply(&allow(t2)), Ok(true));
        assert_eq!(routes.tokens(&d), [t1, t2]);
        assert_eq!(routes.apply(&revoke), Ok(true));
        assert_eq!(routes.tokens(&d), []);
        assert_eq!(routes.target(&d), Some(Target::Tunnel));
        assert_eq!(routes.apply(&revoke), Ok(false));
        for n in 0..MAX_TOKENS_PER_DOMAIN as u8 {
            routes.apply(&allow(TokenHash([n; 32]))).unwrap();
        }
        assert_eq!(
            routes.apply(&allow(TokenHash([255; 32]))),
            Err(RouteError::TooManyTokens(d.clone()))
        );
        routes
            .apply(&RouteChange::Set {
                domain: d.clone(),
                port: 2,
            })
            .unwrap();
        assert_eq!(routes.target(&d), Some(Target::Port(2)));
        assert_eq!(routes.tokens(&d), []);
        assert!(!routes.has_tunnels());
    }

    #[test]
    fn tunnel_routes_from_outside_lose_duplicates_and_may_not_have_too_many_tokens() {
        let [a, b] = [1, 2].map(|n| TokenHash([n; 32]));
        assert_eq!(
            Route::tunnel(vec![a, b, a]),
            Ok(Route::Tunnel { tokens: vec![a, b] })
        );
        let many: Vec<_> = (0..=MAX_TOKENS_PER_DOMAIN as u8)
            .map(|n| TokenHash([n; 32]))
            .collect();
        assert!(Route::tunnel(many).is_err());
    }

    #[test]
    fn names_this_version_refuses_are_left_out_with_the_reason() {
        let Routable { kept, refused } = keep_routable([
            ("Example.com".to_owned(), 80),
            ("127.1".to_owned(), 81),
            ("ok.example".to_owned(), 82),
        ]);
        let kept: Vec<_> = kept.iter().map(|(d, p)| (d.as_str(), *p)).collect();
        assert_eq!(kept, [("example.com", 80), ("ok.example", 82)]);
        assert_eq!(
            refused,
            [("127.1".to_owned(), DomainError::IpAddress("127.1".into()))]
        );
    }

    #[test]
    fn routes_travel_leniently_in_the_wire_format_of_a_list() {
        let wire = postcard::to_stdvec(&vec![("a.example", 1u16), ("127.1", 2), ("b.example", 3)])
            .unwrap();
        let routable: Routable = postcard::from_bytes(&wire).unwrap();
        let names: Vec<_> = routable.kept.iter().map(|(d, _)| d.as_str()).collect();
        assert_eq!(names, ["a.example", "b.example"]);
        assert_eq!(routable.refused.len(), 1);
        let again: Routable =
            postcard::from_bytes(&postcard::to_stdvec(&routable).unwrap()).unwrap();
        assert_eq!(again.kept, routable.kept);
    }
}
