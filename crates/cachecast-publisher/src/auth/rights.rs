//! What a valid token may do: which environments, and which rights.
//!
//! Two rights, in the spirit of Fastly's `purge_select` / `purge_all`: a **scoped**
//! invalidation (scopes, identities, keys: part of a cache) needs `auth.scoped_right`
//! (`purge_select`); a **flush** of a whole environment needs `auth.flush_right`
//! (`purge_all`). They are independent: a token for deploy pipelines can hold only
//! `purge_select`, and can then never empty a cache by mistake.
//!
//! Every endpoint calls [`Grant::authorize`] with the environment and the [`Reach`] of its
//! request, after parsing the body and before publishing anything. Reading an environment's
//! caches and agents needs a third right, `auth.read_right` (`read`), checked by
//! [`Grant::authorize_read`].

use serde_json::{Map, Value};

use super::AuthConfig;

/// How much of an environment's cache a request evicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// Part of it (scopes, identities, keys): needs [`Right::Scoped`].
    Scoped,
    /// All of it: needs [`Right::Flush`].
    Flush,
}

impl Reach {
    /// The reach of a response-cache selector: everything when it names nothing.
    pub fn of_response(selector: &cachecast_proto::ResponseSelector) -> Self {
        if selector.is_all() {
            Reach::Flush
        } else {
            Reach::Scoped
        }
    }

    /// The right this reach needs.
    pub fn needs(self) -> Right {
        match self {
            Reach::Scoped => Right::Scoped,
            Reach::Flush => Right::Flush,
        }
    }
}

/// A right a token can hold; its name in tokens is configured (`auth.scoped_right`,
/// `auth.flush_right`, `auth.read_right`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Right {
    /// Invalidate part of a cache.
    Scoped,
    /// Flush a whole environment.
    Flush,
    /// Read an environment's caches and agents.
    Read,
}

impl Right {
    /// The right's name in tokens under `config`.
    pub fn name(self, config: &AuthConfig) -> &str {
        match self {
            Right::Scoped => &config.scoped_right,
            Right::Flush => &config.flush_right,
            Right::Read => &config.read_right,
        }
    }
}

/// Why a valid token may not do what it asks (`403`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Forbidden {
    #[error(
        "the token does not grant environment {env}; ask for a token that lists it in its {claim} claim"
    )]
    Environment { env: String, claim: String },
    #[error("{}", right_message(*reach, right, claim))]
    Right {
        reach: Reach,
        /// The right's name in tokens.
        right: String,
        /// The claim that should hold it.
        claim: String,
    },
    #[error(
        "reading an environment's caches and agents needs the right {right}, which the token lacks (claim {claim}); ask for a token with {right}"
    )]
    Read {
        /// The right's name in tokens.
        right: String,
        /// The claim that should hold it.
        claim: String,
    },
}

fn right_message(reach: Reach, right: &str, claim: &str) -> String {
    match reach {
        Reach::Flush => format!(
            "flushing a whole environment needs the right {right}, which the token lacks (claim {claim}); name scopes or identities instead, or ask for a token with {right}"
        ),
        Reach::Scoped => format!(
            "a scoped invalidation needs the right {right}, which the token lacks (claim {claim}); ask for a token with {right}"
        ),
    }
}

/// What a valid token allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The token's `sub`.
    pub subject: Option<String>,
    envs: Vec<String>,
    scoped: bool,
    flush: bool,
    read: bool,
    names: Names,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Names {
    envs_claim: String,
    rights_claim: String,
    scoped: String,
    flush: String,
    read: String,
}

/// A claim as a list of strings: an array of strings, or one space-separated string (the
/// OAuth `scope` style). Anything else is an empty list.
fn string_list(value: Option<&Value>) -> Vec<String> {
    match value {
        Some(Value::String(s)) => s.split_whitespace().map(str::to_owned).collect(),
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    }
}

impl Grant {
    /// Reads the rights of verified `claims` under `config`'s claim and right names.
    pub fn from_claims(claims: &Map<String, Value>, config: &AuthConfig) -> Self {
        let rights = string_list(claims.get(&config.rights_claim));
        Self {
            subject: claims
                .get("sub")
                .and_then(|s| s.as_str())
                .map(str::to_owned),
            envs: string_list(claims.get(&config.envs_claim)),
            scoped: rights.contains(&config.scoped_right),
            flush: rights.contains(&config.flush_right),
            read: rights.contains(&config.read_right),
            names: Names {
                envs_claim: config.envs_claim.clone(),
                rights_claim: config.rights_claim.clone(),
                scoped: config.scoped_right.clone(),
                flush: config.flush_right.clone(),
                read: config.read_right.clone(),
            },
        }
    }

    /// True if the token may touch `env` at all.
    pub fn allows(&self, env: &str) -> bool {
        self.envs.iter().any(|e| e == "*" || e == env)
    }

    /// True if the token holds `right`.
    pub fn has(&self, right: Right) -> bool {
        match right {
            Right::Scoped => self.scoped,
            Right::Flush => self.flush,
            Right::Read => self.read,
        }
    }

    /// The environments among `envs` this token may read: none without the read right.
    pub fn readable<'a>(
        &self,
        envs: &'a [cachecast_proto::EnvId],
    ) -> Result<Vec<&'a cachecast_proto::EnvId>, Forbidden> {
        if !self.read {
            return Err(Forbidden::Read {
                right: self.names.read.clone(),
                claim: self.names.rights_claim.clone(),
            });
        }
        Ok(envs
            .iter()
            .filter(|env| self.allows(env.as_str()))
            .collect())
    }

    /// May this token read `env`'s caches and agents?
    pub fn authorize_read(&self, env: &str) -> Result<(), Forbidden> {
        if !self.allows(env) {
            return Err(Forbidden::Environment {
                env: env.to_owned(),
                claim: self.names.envs_claim.clone(),
            });
        }
        if !self.read {
            return Err(Forbidden::Read {
                right: self.names.read.clone(),
                claim: self.names.rights_claim.clone(),
            });
        }
        Ok(())
    }

    /// The rights check every endpoint makes: may this token evict `reach` of `env`?
    pub fn authorize(&self, env: &str, reach: Reach) -> Result<(), Forbidden> {
        if !self.allows(env) {
            return Err(Forbidden::Environment {
                env: env.to_owned(),
                claim: self.names.envs_claim.clone(),
            });
        }
        let right = reach.needs();
        if !self.has(right) {
            let name = match right {
                Right::Scoped => &self.names.scoped,
                Right::Flush => &self.names.flush,
                Right::Read => &self.names.read,
            };
            return Err(Forbidden::Right {
                reach,
                right: name.clone(),
                claim: self.names.rights_claim.clone(),
            });
        }
        Ok(())
    }
}
