//! The `cachecast` NATS service: the HTTP API's invalidation, over NATS request-reply.
//!
//! Event-driven pipelines in any language invalidate and get the confirmation without HTTP:
//! they send a request to `cachecast.svc.v1.<env>.invalidate` and get the same outcome the API
//! answers. The service follows the NATS services API, so `$SRV.PING`, `$SRV.INFO` and
//! `$SRV.STATS` discover and measure it, and replicas share requests through a queue group.
//!
//! A request is protobuf (`cachecast.v1.InvalidateRequest`, answered with an
//! `InvalidateReply`) or JSON (first byte `{`, or `Content-Type: application/json`), answered
//! with the HTTP API's JSON body:
//!
//! ```json
//! {"response": {"scopeClientId": "s1"}, "requestId": "r-1", "timeout": "5s"}
//! {"identity": {"identityTemplate": "User"}}
//! {"keyed": {"cache": "apikeys", "ids": "k1,k2"}}     (ids: a list, a comma list, or "*")
//! ```
//!
//! Who may invalidate which environment is decided by NATS permissions on the subject.

use std::future::Future;
use std::time::Duration;

use async_nats::service::ServiceExt;
use async_nats::{HeaderMap, HeaderValue};
use bytes::Bytes;
use cachecast_bus::Client;
use cachecast_proto::{
    AgentOutcomeReply, EnvId, ErrorReply, InvalidateReply, Subjects, Target, Wire,
};
use futures::StreamExt;

use crate::api::envelope::{self, Encoding};
use crate::api::{ApiConfig, Class, Refusal, outcome_body};
use crate::outcome::{AgentOutcome, Outcome};
use crate::publisher::{InvalidationRequest, Publisher};

/// The service's name in `$SRV` discovery.
pub const SERVICE_NAME: &str = "cachecast";

/// The most requests the service works on at once; more are answered `503 too_many_requests`.
const MAX_IN_FLIGHT: usize = 1024;

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
#[error(
    "could not start the cachecast NATS service: {source}; check the NATS connection and permissions on $SRV.> and cachecast.svc.v1.*.invalidate"
)]
pub struct ServiceError {
    #[source]
    source: async_nats::Error,
}

/// Serves invalidation requests over NATS until `shutdown` resolves.
pub async fn run(
    client: Client,
    publisher: Publisher,
    config: ApiConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServiceError> {
    let service = client
        .service_builder()
        .description(
            "Invalidates caches across a fleet and answers once every live agent confirmed",
        )
        .start(SERVICE_NAME, env!("CARGO_PKG_VERSION"))
        .await
        .map_err(|source| ServiceError { source })?;
    let mut endpoint = service
        .endpoint_builder()
        .name("invalidate")
        .add(Subjects::SERVICE_REQUESTS)
        .await
        .map_err(|source| ServiceError { source })?;
    tracing::info!(subject = Subjects::SERVICE_REQUESTS, "NATS service ready");
    let config = std::sync::Arc::new(config);
    let log_limit = cachecast_bus::LogLimiter::new(Duration::from_secs(10));
    let in_flight = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    // Requests being answered: shutdown waits for their real answers.
    let mut answering = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let request = tokio::select! {
            request = endpoint.next() => request,
            Some(_) = answering.join_next(), if !answering.is_empty() => continue,
            () = &mut shutdown => break,
        };
        let Some(request) = request else { break };
        if let Some(reply) = request.message.reply.as_ref()
            && !Subjects::is_caller_reply(reply.as_str())
        {
            metrics::counter!("cachecast_service_refused_total", "reason" => "reply_subject")
                .increment(1);
            if let Some(left_out) = log_limit.allow("reply_subject") {
                tracing::warn!(
                    reply = reply.as_str(),
                    subject = request.message.subject.as_str(),
                    left_out,
                    "refusing a service request whose reply subject is cachecast's or the server's: not applied, not answered"
                );
            }
            continue;
        }
        let (publisher, config) = (publisher.clone(), config.clone());
        // Each request holds a slot until it is answered: a flood is refused, not queued.
        let slot = in_flight.clone().try_acquire_owned().ok();
        answering.spawn(async move {
            let (reply, headers) = handle(&publisher, &config, &request.message, slot).await;
            // A request without a reply subject is applied and not answered.
            if request.message.reply.is_some()
                && let Err(err) = request.respond_with_headers(Ok(reply), headers).await
            {
                tracing::warn!(error = %err, "could not reply to a service request");
            }
        });
    }
    // No new requests; those in flight get their real answer, each by its own deadline.
    if let Err(err) = service.stop().await {
        tracing::debug!(error = %err, "stopping the NATS service");
    }
    if !answering.is_empty() {
        tracing::info!(
            in_flight = answering.len(),
            "answering the NATS service requests in flight"
        );
    }
    let grace = config.max_timeout + Duration::from_secs(5);
    if tokio::time::timeout(grace, async {
        while answering.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        tracing::warn!(
            ?grace,
            "NATS service requests still in flight after the grace period; stopping anyway"
        );
    }
    Ok(())
}

/// Answers one request: the reply payload and its headers.
async fn handle(
    publisher: &Publisher,
    config: &ApiConfig,
    message: &async_nats::Message,
    slot: Option<tokio::sync::OwnedSemaphorePermit>,
) -> (Bytes, HeaderMap) {
    let content_type = message
        .headers
        .as_ref()
        .and_then(|h| h.get("Content-Type"))
        .map(|v| v.as_str());
    let encoding = Encoding::of(&message.payload, content_type);
    let header_request_id = message
        .headers
        .as_ref()
        .and_then(|h| h.get(cachecast_bus::REQUEST_ID_HEADER))
        .map(|v| v.as_str().to_owned());
    let result = match slot {
        Some(_slot) => {
            invalidate(
                publisher,
                config,
                message,
                encoding,
                header_request_id.clone(),
            )
            .await
        }
        None => Err(Refusal::new(
            Class::Unavailable,
            "too_many_requests",
            format!("the service is working on {MAX_IN_FLIGHT} requests; retry shortly"),
        )
        .retry_after(1)),
    };
    let fallback_id = || {
        header_request_id
            .clone()
            .unwrap_or_else(|| uuid::Uuid::now_v7().to_string())
    };
    let (status, payload, request_id) = match result {
        Ok((outcome, cluster_name)) => {
            let body = outcome_body(&outcome, cluster_name.as_deref());
            let payload = match encoding {
                Encoding::Json => serde_json::to_vec(&body).unwrap_or_default().into(),
                Encoding::Protobuf => outcome_reply(&outcome, body.status).to_bytes(),
            };
            (body.status, payload, outcome.request_id)
        }
        Err(err) => {
            let request_id = if err.request_id.is_empty() {
                fallback_id()
            } else {
                err.request_id.clone()
            };
            let err = err.with_request_id(&request_id);
            let status = err.status();
            tracing::info!(status, code = err.code, request_id = %request_id, "service request refused");
            let payload = match encoding {
                Encoding::Json => serde_json::to_vec(&err.body()).unwrap_or_default().into(),
                Encoding::Protobuf => InvalidateReply {
                    status: u32::from(status),
                    request_id: request_id.clone(),
                    error: Some(ErrorReply {
                        code: err.code.to_owned(),
                        message: err.message,
                    }),
                    ..InvalidateReply::default()
                }
                .to_bytes(),
            };
            (status, payload, request_id)
        }
    };
    let mut headers = HeaderMap::new();
    headers.insert(cachecast_bus::REQUEST_ID_HEADER, request_id.as_str());
    headers.insert(
        "Content-Type",
        match encoding {
            Encoding::Json => "application/json",
            Encoding::Protobuf => "application/protobuf",
        },
    );
    if status != 200 {
        // The NATS services convention for a request that did not succeed.
        headers.insert(
            "Nats-Service-Error",
            HeaderValue::from(status.to_string().as_str()),
        );
        headers.insert(
            "Nats-Service-Error-Code",
            HeaderValue::from(status.to_string().as_str()),
        );
    }
    (payload, headers)
}

/// Reads, publishes and waits for one request.
async fn invalidate(
    publisher: &Publisher,
    config: &ApiConfig,
    message: &async_nats::Message,
    encoding: Encoding,
    header_request_id: Option<String>,
) -> Result<(Outcome, Option<String>), Refusal> {
    let env = Subjects::service_request_env(&message.subject).ok_or_else(|| {
        Refusal::bad_request(
            "invalid_env_id",
            format!(
                "subject {} does not name a valid environment: use cachecast.svc.v1.<env>.invalidate",
                message.subject
            ),
        )
    })?;
    let parsed = envelope::parse(encoding, &message.payload, config)?;
    let request_id = match parsed.request_id.or(header_request_id) {
        Some(id) => {
            crate::validate::request_id(&id)
                .map_err(|m| Refusal::bad_request("invalid_request_id", m))?;
            id
        }
        None => uuid::Uuid::now_v7().to_string(),
    };
    let cluster_name =
        matches!(parsed.target, Target::Keyed(_)).then(|| config.cluster_name.clone());
    let outcome = publisher
        .invalidate(InvalidationRequest {
            env: env.clone(),
            target: parsed.target,
            request_id: request_id.clone(),
            timeout: parsed.timeout,
            // NATS tells a service nothing of its caller but where to reply, and callers'
            // inbox prefixes are theirs (deploy/nats/accounts.conf gives each its own).
            caller: message
                .reply
                .as_ref()
                .map(|reply| format!("nats-reply:{reply}")),
        })
        .await
        .map_err(|err| Refusal::from(err).with_request_id(&request_id))?;
    log_outcome(&env, &outcome);
    Ok((outcome, cluster_name))
}

fn log_outcome(env: &EnvId, outcome: &Outcome) {
    tracing::info!(
        %env,
        request_id = %outcome.request_id,
        total = outcome.agents.len(),
        successful = outcome.successful(),
        took_ms = outcome.took.as_millis() as u64,
        "service invalidation answered"
    );
}

/// The protobuf reply reporting `outcome`.
fn outcome_reply(outcome: &Outcome, status: u16) -> InvalidateReply {
    InvalidateReply {
        status: u32::from(status),
        request_id: outcome.request_id.clone(),
        error: None,
        total: outcome.agents.len() as u32,
        successful: outcome.successful() as u32,
        failed: (outcome.agents.len() - outcome.successful()) as u32,
        agents: outcome
            .agents
            .iter()
            .map(|(id, o)| {
                let evicted = match o {
                    AgentOutcome::Applied { evicted, .. } => *evicted,
                    _ => 0,
                };
                let error = match o {
                    AgentOutcome::Failed { reason, .. } => reason.clone(),
                    AgentOutcome::Unattended { .. } | AgentOutcome::Lagging { .. } => {
                        o.reason().unwrap_or_default()
                    }
                    _ => String::new(),
                };
                AgentOutcomeReply {
                    agent_id: id.to_string(),
                    status: o.status().into(),
                    evicted,
                    error,
                    latency_ms: o.latency().as_millis() as u64,
                }
            })
            .collect(),
    }
}
