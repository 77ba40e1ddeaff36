//! Authentication, rate limiting and the rights check, as every endpoint makes them.
//!
//! An endpoint calls [`authenticate`] first (`401`, `429`, `503`), then [`environment`] as soon
//! as it knows the environment (`403 forbidden_environment` before reading the body), and
//! [`authorize`] once it knows how much it will evict (`403 missing_right`).

use axum::http::{HeaderMap, StatusCode, header};

use super::error::ApiError;
use super::rate_limit::RateLimiter;
use crate::auth::{AuthError, Forbidden, Grant, Reach, Verifier};

/// Verifies the bearer token and charges it one request.
pub(crate) async fn authenticate(
    verifier: &Verifier,
    limiter: &RateLimiter,
    headers: &HeaderMap,
) -> Result<Grant, ApiError> {
    let authorization = headers
        .get(header::AUTHORIZATION)
        .map(|v| v.to_str().unwrap_or("\u{0}not visible ASCII"));
    let grant = verifier.verify(authorization).await.map_err(auth_error)?;
    if let Err(wait) = limiter.check(authorization.unwrap_or_default()) {
        let seconds = wait.as_secs_f64().ceil().max(1.0) as u64;
        return Err(ApiError {
            retry_after: Some(seconds),
            ..ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!(
                    "this token sent more requests than api.rate_limit_per_second allows; retry in {seconds} s"
                ),
            )
        });
    }
    Ok(grant)
}

/// `403 forbidden_environment` unless the token lists `env`.
pub(crate) fn environment(grant: &Grant, env: &str) -> Result<(), ApiError> {
    if grant.allows(env) {
        return Ok(());
    }
    // Any reach: the environment is checked first.
    grant.authorize(env, Reach::Scoped).map_err(forbidden)
}

/// The rights check: `403` naming the missing right, or the environment.
pub fn authorize(grant: &Grant, env: &str, reach: Reach) -> Result<(), ApiError> {
    grant.authorize(env, reach).map_err(forbidden)
}

fn forbidden(err: Forbidden) -> ApiError {
    let code = match err {
        Forbidden::Environment { .. } => "forbidden_environment",
        Forbidden::Right { .. } => "missing_right",
    };
    ApiError::new(StatusCode::FORBIDDEN, code, err.to_string())
}

fn auth_error(err: AuthError) -> ApiError {
    let (status, code) = match err {
        AuthError::MissingToken => (StatusCode::UNAUTHORIZED, "missing_token"),
        AuthError::Expired => (StatusCode::UNAUTHORIZED, "token_expired"),
        AuthError::KeysUnavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "auth_unavailable"),
        _ => (StatusCode::UNAUTHORIZED, "invalid_token"),
    };
    let retry_after = (status == StatusCode::SERVICE_UNAVAILABLE).then_some(5);
    ApiError {
        retry_after,
        ..ApiError::new(status, code, err.to_string())
    }
}
