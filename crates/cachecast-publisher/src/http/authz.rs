//! Authentication, rate limiting and the rights check, as every endpoint makes them.
//!
//! An endpoint calls [`authenticate`] first (`401`, `429`, `503`), then [`environment`] as soon
//! as it knows the environment (`403 forbidden_environment` before reading the body), and
//! [`authorize`] once it knows how much it will evict (`403 missing_right`).

use axum::http::{HeaderMap, header};

use super::rate_limit::RateLimiter;
use crate::api::{Class, Refusal};
use crate::auth::{AuthError, Forbidden, Grant, Reach, Verifier};

/// Verifies the bearer token and charges it one request.
pub(crate) async fn authenticate(
    verifier: &Verifier,
    limiter: &RateLimiter,
    headers: &HeaderMap,
) -> Result<Grant, Refusal> {
    let authorization = headers
        .get(header::AUTHORIZATION)
        .map(|v| v.to_str().unwrap_or("\u{0}not visible ASCII"));
    let grant = verifier.verify(authorization).await.map_err(auth_error)?;
    if let Err(wait) = limiter.check(authorization.unwrap_or_default()) {
        let seconds = wait.as_secs_f64().ceil().max(1.0) as u64;
        return Err(Refusal::new(
            Class::TooManyRequests,
            "rate_limited",
            format!(
                "this token sent more requests than api.rate_limit_per_second allows; retry in {seconds} s"
            ),
        )
        .retry_after(seconds));
    }
    Ok(grant)
}

/// `403 forbidden_environment` unless the token lists `env`.
pub(crate) fn environment(grant: &Grant, env: &str) -> Result<(), Refusal> {
    if grant.allows(env) {
        return Ok(());
    }
    // Any reach: the environment is checked first.
    grant.authorize(env, Reach::Scoped).map_err(forbidden)
}

/// `403` unless the token may read `env`'s caches and agents.
pub(crate) fn authorize_read(grant: &Grant, env: &str) -> Result<(), Refusal> {
    grant.authorize_read(env).map_err(forbidden)
}

/// The environments among `envs` the token may read; `403` without the read right.
pub(crate) fn readable<'a>(
    grant: &Grant,
    envs: &'a [cachecast_proto::EnvId],
) -> Result<Vec<&'a cachecast_proto::EnvId>, Refusal> {
    grant.readable(envs).map_err(forbidden)
}

/// The rights check: `403` naming the missing right, or the environment.
pub fn authorize(grant: &Grant, env: &str, reach: Reach) -> Result<(), Refusal> {
    grant.authorize(env, reach).map_err(forbidden)
}

fn forbidden(err: Forbidden) -> Refusal {
    let code = match err {
        Forbidden::Environment { .. } => "forbidden_environment",
        Forbidden::Right { .. } | Forbidden::Read { .. } => "missing_right",
    };
    Refusal::new(Class::Forbidden, code, err.to_string())
}

fn auth_error(err: AuthError) -> Refusal {
    let (class, code) = match err {
        AuthError::MissingToken => (Class::Unauthenticated, "missing_token"),
        AuthError::Expired => (Class::Unauthenticated, "token_expired"),
        AuthError::KeysUnavailable(_) => (Class::Unavailable, "auth_unavailable"),
        _ => (Class::Unauthenticated, "invalid_token"),
    };
    let refusal = Refusal::new(class, code, err.to_string());
    if class == Class::Unavailable {
        refusal.retry_after(5)
    } else {
        refusal
    }
}
