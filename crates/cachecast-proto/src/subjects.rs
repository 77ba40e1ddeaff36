//! NATS subject names and presence keys.
//!
//! Events: `cachecast.v1.<env>.inval`; the stream's copy of each as it stores it (republish):
//! `cachecast.v1.<env>.live`. Acks:
//! `cachecast.v1.<env>.ack.<publisherId>.<eventId>.<agentId>`, several together
//! `cachecast.v1.<env>.ack.<publisherId>.acks.<agentId>`.
//! Service requests: `cachecast.svc.v1.<env>.invalidate`.
//! Presence: key `<env>.<agentId>` in the presence bucket. Registration of a persistent cache:
//! key `<env>.<cacheId>` in the caches bucket. Every token here is either a
//! validated id or a server-generated one, so no subject built here contains a wildcard.

use crate::{AgentId, CacheId, EnvId};

const PREFIX: &str = "cachecast.v1";

/// Subject names, all in one place.
#[derive(Debug, Clone, Copy)]
pub struct Subjects;

impl Subjects {
    /// What the invalidation stream captures: every environment's events.
    pub const ALL_EVENTS: &'static str = "cachecast.v1.*.inval";

    /// The event subject of one environment.
    pub fn events(env: &EnvId) -> String {
        format!("{PREFIX}.{env}.inval")
    }

    /// Where the stream republishes each event of every environment once it stored it, as a
    /// template of its `republish` destination (`{{wildcard(1)}}` is the environment).
    pub const LIVE_TEMPLATE: &'static str = "cachecast.v1.{{wildcard(1)}}.live";

    /// Where agents of one environment receive its events as the stream stores them.
    pub fn live(env: &EnvId) -> String {
        format!("{PREFIX}.{env}.live")
    }

    /// Where the agents of `env` acknowledge one event of one publisher.
    pub fn ack(env: &EnvId, publisher_id: &str, event_id: &str) -> String {
        format!("{PREFIX}.{env}.ack.{publisher_id}.{event_id}")
    }

    /// Where `agent` publishes its ack of an event whose ack subject is `ack_subject`: the
    /// agent id as the last token, so NATS permissions can bind each agent user to its own
    /// acks (`cachecast.v1.<env>.ack.*.*.<agentId>`).
    pub fn ack_from(ack_subject: &str, agent: &AgentId) -> String {
        let mut subject = String::with_capacity(ack_subject.len() + 1 + agent.as_str().len());
        subject.push_str(ack_subject);
        subject.push('.');
        subject.push_str(agent.as_str());
        subject
    }

    /// The token that stands for the event id in the subject of several acks together
    /// (event ids are hex, so it names no event).
    pub const ACKS_TOGETHER: &'static str = "acks";

    /// Where `agent` publishes several acks together (`Acks`) to the publisher of the event
    /// whose ack subject is `ack_subject`: that subject with [`Self::ACKS_TOGETHER`] for the
    /// event id, so the same permission binds it to the agent.
    pub fn acks_from(ack_subject: &str, agent: &AgentId) -> Option<String> {
        let (publisher, _event) = ack_subject.rsplit_once('.')?;
        Some(format!("{publisher}.{}.{agent}", Self::ACKS_TOGETHER))
    }

    /// What every ack subject of `env` starts with.
    pub fn ack_prefix(env: &EnvId) -> String {
        format!("{PREFIX}.{env}.ack.")
    }

    /// Every ack addressed to one publisher, in any environment, with or without the
    /// sending agent's id as the last token.
    pub fn acks_for_publisher(publisher_id: &str) -> String {
        format!("{PREFIX}.*.ack.{publisher_id}.>")
    }

    /// Where API replicas ask each other for the status of an asynchronous request (the
    /// request id is the payload; only the replica that holds it answers).
    pub const REQUEST_STATUS: &'static str = "cachecast.api.v1.status";

    /// Where the `cachecast` NATS service takes invalidation requests, every environment.
    pub const SERVICE_REQUESTS: &'static str = "cachecast.svc.v1.*.invalidate";

    /// Where the `cachecast` NATS service takes invalidation requests for `env`.
    pub fn service_request(env: &EnvId) -> String {
        format!("cachecast.svc.v1.{env}.invalidate")
    }

    /// The environment of a service request subject, if the subject is one.
    pub fn service_request_env(subject: &str) -> Option<EnvId> {
        let env = subject
            .strip_prefix("cachecast.svc.v1.")?
            .strip_suffix(".invalidate")?;
        EnvId::new(env).ok()
    }

    /// What the audit stream captures: every environment's records.
    pub const ALL_AUDIT: &'static str = "cachecast.audit.v1.*";

    /// Where a publisher records the invalidations of `env` and their outcomes.
    pub fn audit(env: &EnvId) -> String {
        format!("cachecast.audit.v1.{env}")
    }

    /// The presence key of one agent.
    pub fn presence_key(env: &EnvId, agent: &AgentId) -> String {
        format!("{env}.{agent}")
    }

    /// Whether a reply may go to `subject`: never to cachecast's own subjects or the server's
    /// (`$JS.API`, `$KV`, `$SRV`, `$SYS`...). A reply is published with the answering process's
    /// NATS permissions, which include publishing events and JetStream API requests, so a
    /// caller choosing such a reply subject could otherwise make it publish a (garbage) event or
    /// an API request (deleting the stream, say) on the caller's behalf.
    pub fn is_caller_reply(subject: &str) -> bool {
        !subject.starts_with('$') && !subject.starts_with("cachecast.")
    }
}

/// The key of a persistent cache's registration: `<env>.<cacheId>`.
pub fn cache_key(env: &EnvId, cache: &CacheId) -> String {
    format!("{env}.{cache}")
}

/// Splits a registration key back into its environment and cache id.
pub fn parse_cache_key(key: &str) -> Option<(EnvId, CacheId)> {
    let (env, cache) = key.split_once('.')?;
    Some((EnvId::new(env).ok()?, CacheId::new(cache).ok()?))
}

/// Splits a presence key back into its environment and agent id.
pub fn parse_presence_key(key: &str) -> Option<(EnvId, AgentId)> {
    let (env, agent) = key.split_once('.')?;
    Some((EnvId::new(env).ok()?, AgentId::new(agent).ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_go_only_to_callers_inboxes() {
        assert!(Subjects::is_caller_reply("_INBOX.caller.dev.abc.1"));
        assert!(Subjects::is_caller_reply("_INBOX.x"));
        for reflected in [
            "$JS.API.STREAM.DELETE.CACHECAST",
            "$KV.cachecast-agents.dev.ghost",
            "$SRV.PING",
            "cachecast.v1.prod.inval",
            "cachecast.v1.dev.ack.p.e",
        ] {
            assert!(!Subjects::is_caller_reply(reflected), "{reflected}");
        }
    }

    #[test]
    fn subjects_have_the_documented_shape() {
        let env = EnvId::new("dev").expect("valid");
        assert_eq!(Subjects::events(&env), "cachecast.v1.dev.inval");
        assert_eq!(
            Subjects::ack(&env, "p1", "e1"),
            "cachecast.v1.dev.ack.p1.e1"
        );
        assert!(Subjects::ack(&env, "p1", "e1").starts_with(&Subjects::ack_prefix(&env)));
        assert_eq!(
            Subjects::acks_for_publisher("p1"),
            "cachecast.v1.*.ack.p1.>"
        );
        let agent = AgentId::new("paa-1").expect("valid");
        assert_eq!(
            Subjects::ack_from(&Subjects::ack(&env, "p1", "e1"), &agent),
            "cachecast.v1.dev.ack.p1.e1.paa-1"
        );
        assert_eq!(
            Subjects::acks_from(&Subjects::ack(&env, "p1", "e1"), &agent).as_deref(),
            Some("cachecast.v1.dev.ack.p1.acks.paa-1")
        );
    }

    #[test]
    fn presence_keys_round_trip() {
        let env = EnvId::new("dev").expect("valid");
        let agent = AgentId::new("pod-1_a").expect("valid");
        let key = Subjects::presence_key(&env, &agent);
        assert_eq!(parse_presence_key(&key), Some((env, agent)));
        assert_eq!(parse_presence_key("nodot"), None);
        assert_eq!(parse_presence_key("dev.a.b"), None);
    }
}
