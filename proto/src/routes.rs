//! The routes table: which local port serves which domain.
//!
//! The worker holds the live table and applies UDP commands to it; it reports every
//! [`RouteChange`] to the supervisor, which applies the same change to its copy and persists it.
//! One type, one `apply`, so both copies change by the same rule.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::command::Command;
use crate::domain::Domain;

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
}
