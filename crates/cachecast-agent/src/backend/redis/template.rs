//! Key templates: where the PDP keeps each kind of entry in Redis, and what an eviction
//! addresses there (one key, or a `SCAN MATCH` pattern).

use cachecast_proto::{EnvId, ResponseSelector};

use crate::backend::BackendError;

/// A parsed key template over a fixed set of placeholders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct KeyTemplate {
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    /// The placeholder at this index of the template's placeholder list.
    Var(usize),
}

/// The placeholders of each kind of template, in the order their values are passed.
pub(super) const RESPONSE_VARS: &[&str] = &["env", "scopeClientId", "identityId"];
pub(super) const IDENTITY_VARS: &[&str] = &["env", "identityTemplate", "identityId"];
pub(super) const KEYED_VARS: &[&str] = &["env", "id"];

/// What one rendered template addresses: one key, or every key a `SCAN MATCH` pattern finds.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Keys {
    Exact(String),
    Pattern(String),
}

impl KeyTemplate {
    /// Parses `template` (the setting `setting`) over the placeholders `vars`.
    pub(super) fn parse(
        setting: &str,
        template: &str,
        vars: &[&str],
    ) -> Result<Self, BackendError> {
        let bad = |why: &str| {
            let names: Vec<String> = vars.iter().map(|v| format!("{{{v}}}")).collect();
            BackendError::Setting(format!(
                "{setting} {template:?} {why}; placeholders are {}",
                names.join(", ")
            ))
        };
        let mut parts = Vec::new();
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Literal(rest[..open].to_owned()));
            }
            let close = rest[open..]
                .find('}')
                .ok_or_else(|| bad("has an unclosed '{'"))?;
            let name = &rest[open + 1..open + close];
            let index = vars
                .iter()
                .position(|v| *v == name)
                .ok_or_else(|| bad(&format!("has an unknown placeholder {{{name}}}")))?;
            parts.push(Part::Var(index));
            rest = &rest[open + close + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Literal(rest.to_owned()));
        }
        if parts.is_empty() {
            return Err(bad("is empty"));
        }
        Ok(Self { parts })
    }

    /// The keys the template addresses with `values` (by placeholder index; `None` is open
    /// and matches anything). Values are glob-escaped, so an id matches only itself.
    pub(super) fn render(&self, values: &[Option<&str>]) -> Keys {
        let mut pattern = String::new();
        let mut literal = String::new();
        let mut exact = true;
        for part in &self.parts {
            match part {
                Part::Literal(text) => {
                    exact &= !text.contains(['*', '?', '[']);
                    pattern.push_str(text);
                    literal.push_str(text);
                }
                Part::Var(index) => match values.get(*index).copied().flatten() {
                    Some(value) => {
                        escape_glob(value, &mut pattern);
                        literal.push_str(value);
                    }
                    None => {
                        exact = false;
                        pattern.push('*');
                    }
                },
            }
        }
        if exact {
            Keys::Exact(literal)
        } else {
            Keys::Pattern(pattern)
        }
    }

    /// What covers everything `selector` matches in the response cache of `env`.
    pub(super) fn response_keys(&self, env: &EnvId, selector: &ResponseSelector) -> Vec<Keys> {
        let identity = selector.identity_id.as_deref();
        let mut keys: Vec<Keys> = if selector.scope_client_ids.is_empty() {
            vec![self.render(&[Some(env.as_str()), None, identity])]
        } else {
            selector
                .scope_client_ids
                .iter()
                .map(|scope| self.render(&[Some(env.as_str()), Some(scope), identity]))
                .collect()
        };
        keys.sort();
        keys.dedup();
        keys
    }
}

/// Escapes Redis glob metacharacters, so an id matches only itself.
fn escape_glob(value: &str, out: &mut String) {
    for c in value.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\' | '^') {
            out.push('\\');
        }
        out.push(c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> EnvId {
        EnvId::new("dev").expect("valid")
    }

    fn response_template() -> KeyTemplate {
        KeyTemplate::parse(
            "redis.key_template",
            super::super::RedisConfig::default().key_template.as_str(),
            RESPONSE_VARS,
        )
        .expect("default parses")
    }

    fn patterns(keys: &[&str]) -> Vec<Keys> {
        keys.iter()
            .map(|k| Keys::Pattern((*k).to_owned()))
            .collect()
    }

    #[test]
    fn open_parts_become_wildcards() {
        let t = response_template();
        let all = ResponseSelector::default();
        assert_eq!(t.response_keys(&env(), &all), patterns(&["pdp:dev:*:*:*"]));
        let scoped = ResponseSelector {
            scope_client_ids: vec!["s2".into(), "s1".into(), "s1".into()],
            identity_id: Some("alice".into()),
        };
        assert_eq!(
            t.response_keys(&env(), &scoped),
            patterns(&["pdp:dev:s1:alice:*", "pdp:dev:s2:alice:*"])
        );
    }

    #[test]
    fn a_fully_known_key_is_exact_and_not_escaped() {
        let t = KeyTemplate::parse(
            "t",
            "id:{env}:{identityTemplate}:{identityId}",
            IDENTITY_VARS,
        )
        .expect("parses");
        assert_eq!(
            t.render(&[Some("dev"), Some("User"), Some("a*b")]),
            Keys::Exact("id:dev:User:a*b".into())
        );
        assert_eq!(
            t.render(&[Some("dev"), None, Some("a*b")]),
            Keys::Pattern(r"id:dev:*:a\*b".into())
        );
    }

    #[test]
    fn ids_cannot_smuggle_glob_patterns() {
        let t = response_template();
        let sel = ResponseSelector {
            scope_client_ids: vec![],
            identity_id: Some("a*[b]?\\".into()),
        };
        assert_eq!(
            t.response_keys(&env(), &sel),
            patterns(&[r"pdp:dev:*:a\*\[b\]\?\\:*"])
        );
    }

    #[test]
    fn bad_templates_name_the_problem() {
        for (template, why) in [
            ("pdp:{tenant}:*", "unknown placeholder {tenant}"),
            ("pdp:{env", "unclosed"),
            ("", "empty"),
        ] {
            let err = KeyTemplate::parse("redis.key_template", template, RESPONSE_VARS)
                .expect_err(template)
                .to_string();
            assert!(err.contains(why), "{err}");
            assert!(err.contains("redis.key_template"), "{err}");
        }
        let err = KeyTemplate::parse(
            "redis.keyed_caches.apikeys",
            "k:{scopeClientId}",
            KEYED_VARS,
        )
        .expect_err("keyed templates have no scope")
        .to_string();
        assert!(
            err.contains("redis.keyed_caches.apikeys") && err.contains("{id}"),
            "{err}"
        );
    }
}
