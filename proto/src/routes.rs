//! The routes table: which local port serves which domain.
//!
//! The worker holds the live table and applies UDP commands to it; it reports every
//! [`RouteChange`] to the supervisor, which applies the same change to its copy and persists it.
//! One type, one `apply`, so both copies change by the same rule.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::command::Command;
use crate::domain::{Domain, DomainError};

/// One change to the table, as reported from worker to supervisor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RouteChange {
    Set { domain: Domain, port: u16 },
    Remove { domain: Domain },
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
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Routes(BTreeMap<Domain, u16>);

impl Routes {
    /// Applies `change`. Returns whether the table is now different.
    pub fn apply(&mut self, change: &RouteChange) -> Result<bool, RouteError> {
        match change {
            RouteChange::Set { domain, port } => {
                Ok(self.0.insert(domain.clone(), *port) != Some(*port))
            }
            RouteChange::Remove { domain } => match self.0.remove(domain) {
                Some(_) => Ok(true),
                None => Err(RouteError::NoSuchRoute(domain.clone())),
            },
        }
    }

    pub fn port(&self, domain: &Domain) -> Option<u16> {
        self.0.get(domain).copied()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&Domain, u16)> {
        self.0.iter().map(|(d, p)| (d, *p))
    }

    /// The table in pieces of at most `size` routes, for messages of bounded size.
    pub fn chunks(&self, size: usize) -> Vec<Vec<(Domain, u16)>> {
        let all: Vec<_> = self.0.iter().map(|(d, p)| (d.clone(), *p)).collect();
        all.chunks(size).map(<[_]>::to_vec).collect()
    }
}

impl FromIterator<(Domain, u16)> for Routes {
    fn from_iter<I: IntoIterator<Item = (Domain, u16)>>(iter: I) -> Self {
        Routes(iter.into_iter().collect())
    }
}

/// Routes as an older core-server kept them (its routes file, or the routes it hands over on
/// a rerun), whose rules for names may have been looser: the names this version refuses (a
/// name a browser reads as an IP address, say) are left out, each with the reason; the others
/// are kept. A route this version refuses could never be served anyway.
pub fn keep_routable(entries: impl IntoIterator<Item = (String, u16)>) -> Routable {
    let mut routable = Routable::default();
    for (name, port) in entries {
        match Domain::parse(&name) {
            Ok(domain) => routable.kept.push((domain, port)),
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
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Routable {
    pub kept: Vec<(Domain, u16)>,
    pub refused: Vec<(String, DomainError)>,
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
        assert_eq!(routes.port(&d), Some(2));
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
