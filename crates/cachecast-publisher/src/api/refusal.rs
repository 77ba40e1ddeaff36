//! The one refusal every way in answers with: its class, a stable `code`, a `message` for
//! people that says what to do, the request id, and when to retry.
//!
//! `http/` renders it as a response (`{"status", "code", "message", "requestId"}` with the
//! class's status), the NATS service as an `InvalidateReply` or the same JSON, with the NATS
//! services error headers.

use serde::Serialize;

use crate::publisher::PublishError;

/// What kind of refusal it is; each transport renders it (HTTP and the NATS service both as the
/// HTTP status number).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// The request is malformed or names something invalid (400).
    BadRequest,
    /// No valid credentials (401).
    Unauthenticated,
    /// Valid credentials without the right or the environment (403).
    Forbidden,
    /// Nothing there (404).
    NotFound,
    /// The path exists, not with this method (405).
    MethodNotAllowed,
    /// The body did not arrive in time (408).
    RequestTimeout,
    /// It clashes with something that exists (409).
    Conflict,
    /// The body is over the size limit (413).
    TooLarge,
    /// A content type or encoding the API does not read (415).
    UnsupportedMediaType,
    /// Over the rate limit (429).
    TooManyRequests,
    /// The service cannot take it now; retry shortly (503).
    Unavailable,
}

impl Class {
    /// The HTTP status of this class (also the NATS service's reply status).
    pub fn status(self) -> u16 {
        match self {
            Class::BadRequest => 400,
            Class::Unauthenticated => 401,
            Class::Forbidden => 403,
            Class::NotFound => 404,
            Class::MethodNotAllowed => 405,
            Class::RequestTimeout => 408,
            Class::Conflict => 409,
            Class::TooLarge => 413,
            Class::UnsupportedMediaType => 415,
            Class::TooManyRequests => 429,
            Class::Unavailable => 503,
        }
    }
}

/// A refused request.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub class: Class,
    pub code: &'static str,
    pub message: String,
    pub request_id: String,
    /// Seconds, for `503` and `429`.
    pub retry_after: Option<u64>,
}

/// The body of every refusal.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ErrorBody {
    /// The HTTP status.
    pub status: u16,
    /// Stable and machine-readable, like `invalid_env_id` or `bus_unavailable`.
    pub code: String,
    /// For people: what went wrong and what to do.
    pub message: String,
    pub request_id: String,
}

impl Refusal {
    pub fn new(class: Class, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            class,
            code,
            message: message.into(),
            request_id: String::new(),
            retry_after: None,
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(Class::BadRequest, code, message)
    }

    pub fn with_request_id(mut self, request_id: &str) -> Self {
        request_id.clone_into(&mut self.request_id);
        self
    }

    /// Says to retry after `seconds`.
    pub fn retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    /// The status number either transport answers with.
    pub fn status(&self) -> u16 {
        self.class.status()
    }

    /// The JSON body of this refusal.
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            status: self.status(),
            code: self.code.to_owned(),
            message: self.message.clone(),
            request_id: self.request_id.clone(),
        }
    }
}

impl From<PublishError> for Refusal {
    fn from(err: PublishError) -> Self {
        match err {
            PublishError::Unavailable(reason) => Refusal::new(
                Class::Unavailable,
                "bus_unavailable",
                format!("the invalidation was not published ({reason}); it is safe to retry"),
            )
            .retry_after(1),
            PublishError::Invalid(message) => Refusal::bad_request("invalid_value", message),
        }
    }
}
