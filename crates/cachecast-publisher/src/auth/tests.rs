//! Token verification against real keys: HS256, PEM files, and a JWKS served over HTTP by a
//! local server (kid rotation, bounded refresh, an unreachable provider).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use cachecast_testkit::keys::TestKey;
use jsonwebtoken::{EncodingKey, Header};
use serde_json::json;

use super::*;

fn hs_config(secret: &str) -> AuthConfig {
    AuthConfig::hs256_for_development(secret)
}

fn spec(envs: &[&str], rights: &[Right]) -> TokenSpec {
    TokenSpec {
        subject: "test".into(),
        envs: envs.iter().map(|e| e.to_string()).collect(),
        rights: rights.to_vec(),
        ttl: Duration::from_secs(60),
    }
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

/// Signs arbitrary claims with `key`.
fn sign(key: &TestKey, kid: Option<&str>, claims: &serde_json::Value) -> String {
    let signer = Signer::from_pem(key.private_pem.as_bytes(), kid).expect("signer");
    let mut header = Header::new(signer.algorithm());
    header.kid = kid.map(str::to_owned);
    let encoding = match key.alg {
        Algorithm::RS256 => EncodingKey::from_rsa_pem(key.private_pem.as_bytes()),
        _ => EncodingKey::from_ec_pem(key.private_pem.as_bytes()),
    }
    .expect("key");
    jsonwebtoken::encode(&header, claims, &encoding).expect("sign")
}

fn good_claims() -> serde_json::Value {
    json!({"sub": "t", "exp": now() + 600, "envs": ["dev"], "rights": ["purge_select", "purge_all"]})
}

fn pem_file(pem: &str) -> tempfile_path::TempPem {
    tempfile_path::TempPem::new(pem)
}

/// A temporary PEM file, removed on drop (no tempfile dependency in this crate).
mod tempfile_path {
    pub(super) struct TempPem(pub(super) std::path::PathBuf);
    impl TempPem {
        pub(super) fn new(pem: &str) -> Self {
            let path = std::env::temp_dir().join(format!(
                "cachecast-test-key-{}-{}.pem",
                std::process::id(),
                uuid::Uuid::now_v7()
            ));
            std::fs::write(&path, pem).expect("write PEM");
            Self(path)
        }
    }
    impl Drop for TempPem {
        fn drop(&mut self) {
            std::fs::remove_file(&self.0).ok();
        }
    }
}

#[tokio::test]
async fn hs256_tokens_grant_their_environments_and_rights() {
    let config = hs_config("s3cret");
    let verifier = Verifier::new(&config).expect("configured");
    let secret = Secret::new("s3cret");
    let t = issue_hs256(&secret, &config, &spec(&["dev", "qa"], &[Right::Scoped])).expect("signs");
    let grant = verifier.verify(Some(&bearer(&t))).await.expect("valid");
    assert!(grant.allows("dev") && grant.allows("qa") && !grant.allows("prod"));
    assert_eq!(grant.authorize("dev", Reach::Scoped), Ok(()));
    assert!(matches!(
        grant.authorize("dev", Reach::Flush),
        Err(Forbidden::Right { ref right, .. }) if right == "purge_all"
    ));
    assert!(matches!(
        grant.authorize("prod", Reach::Scoped),
        Err(Forbidden::Environment { .. })
    ));
    let all = issue_hs256(
        &secret,
        &config,
        &TokenSpec::full("t", &["*".into()], Duration::from_secs(60)),
    )
    .expect("signs");
    let grant = verifier.verify(Some(&bearer(&all))).await.expect("valid");
    assert_eq!(grant.authorize("prod", Reach::Flush), Ok(()));
}

#[tokio::test]
async fn claim_and_right_names_are_configurable() {
    let config = AuthConfig {
        envs_claim: "cachecast/envs".into(),
        rights_claim: "scope".into(),
        scoped_right: "cache:invalidate".into(),
        flush_right: "cache:flush".into(),
        ..hs_config("s3cret")
    };
    let verifier = Verifier::new(&config).expect("configured");
    // The OAuth style: one space-separated string.
    let claims =
        json!({"exp": now() + 60, "cachecast/envs": ["dev"], "scope": "openid cache:flush"});
    let token = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(b"s3cret"),
    )
    .expect("sign");
    let grant = verifier.verify(Some(&bearer(&token))).await.expect("valid");
    assert_eq!(grant.authorize("dev", Reach::Flush), Ok(()));
    let err = grant
        .authorize("dev", Reach::Scoped)
        .expect_err("no scoped right");
    assert!(err.to_string().contains("cache:invalidate"), "{err}");
    // Issued tokens use the configured names too.
    let issued = issue_hs256(
        &Secret::new("s3cret"),
        &config,
        &spec(&["dev"], &[Right::Scoped]),
    )
    .expect("signs");
    let grant = verifier
        .verify(Some(&bearer(&issued)))
        .await
        .expect("valid");
    assert_eq!(grant.authorize("dev", Reach::Scoped), Ok(()));
}

#[test]
fn hs256_is_refused_unless_allowed_and_something_must_verify() {
    let not_allowed = AuthConfig {
        hs256_secret: Some(Secret::new("s")),
        ..AuthConfig::default()
    };
    assert_eq!(
        Verifier::new(&not_allowed).err(),
        Some(AuthError::Hs256NotAllowed)
    );
    assert_eq!(
        Verifier::new(&AuthConfig::default()).err(),
        Some(AuthError::NoKeys)
    );
    let allowed_without_secret = AuthConfig {
        allow_hs256: true,
        ..AuthConfig::default()
    };
    assert_eq!(
        Verifier::new(&allowed_without_secret).err(),
        Some(AuthError::NoSecret)
    );
    // The messages say what to set.
    assert!(
        AuthError::Hs256NotAllowed
            .to_string()
            .contains("allow_hs256")
    );
    assert!(AuthError::NoKeys.to_string().contains("jwks_url"));
}

#[tokio::test]
async fn bad_tokens_are_refused_with_the_reason() {
    let verifier = Verifier::new(&hs_config("s3cret")).expect("configured");
    assert_eq!(verifier.verify(None).await, Err(AuthError::MissingToken));
    assert_eq!(
        verifier.verify(Some("Basic abc")).await,
        Err(AuthError::NotBearer)
    );
    assert!(matches!(
        verifier.verify(Some("Bearer not.a.jwt")).await,
        Err(AuthError::Invalid(_))
    ));
    let other = issue_hs256(
        &Secret::new("other"),
        &hs_config("other"),
        &spec(&["dev"], &[]),
    )
    .expect("signs");
    assert!(matches!(
        verifier.verify(Some(&bearer(&other))).await,
        Err(AuthError::Invalid(_))
    ));
    // alg none, unsigned.
    let none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJ0IiwiZXhwIjo0MTAyNDQ0ODAwLCJlbnZzIjpbImRldiJdfQ.";
    assert!(matches!(
        verifier.verify(Some(&bearer(none))).await,
        Err(AuthError::Invalid(_))
    ));
    // HS512 is not accepted even with the right secret.
    let hs512 = jsonwebtoken::encode(
        &Header::new(Algorithm::HS512),
        &good_claims(),
        &EncodingKey::from_secret(b"s3cret"),
    )
    .expect("sign");
    assert!(matches!(
        verifier.verify(Some(&bearer(&hs512))).await,
        Err(AuthError::Invalid(_))
    ));
}

#[tokio::test]
async fn pem_keys_verify_rs256_and_es256_and_refuse_algorithm_confusion() {
    for key in [TestKey::rsa("r1"), TestKey::ec("e1")] {
        let file = pem_file(&key.public_pem);
        let config = AuthConfig {
            public_key_file: Some(file.0.clone()),
            ..AuthConfig::default()
        };
        let verifier = Verifier::new(&config).expect("configured");
        let grant = verifier
            .verify(Some(&bearer(&sign(&key, None, &good_claims()))))
            .await
            .expect("valid");
        assert_eq!(grant.authorize("dev", Reach::Flush), Ok(()));

        // An HS256 token "signed" with the public key's bytes: the classic confusion attack.
        let forged = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &good_claims(),
            &EncodingKey::from_secret(key.public_pem.as_bytes()),
        )
        .expect("sign");
        assert!(
            matches!(
                verifier.verify(Some(&bearer(&forged))).await,
                Err(AuthError::Invalid(_))
            ),
            "{:?}: HS256 signed with the public key must be refused",
            key.alg
        );
        // Even with HS256 enabled for development, the public key is never an HMAC secret.
        let both = AuthConfig {
            hs256_secret: Some(Secret::new("dev-secret")),
            allow_hs256: true,
            ..config.clone()
        };
        let verifier = Verifier::new(&both).expect("configured");
        assert!(matches!(
            verifier.verify(Some(&bearer(&forged))).await,
            Err(AuthError::Invalid(_))
        ));
        // A token signed by another key of the same kind.
        let other = if key.alg == Algorithm::RS256 {
            TestKey::rsa("x")
        } else {
            TestKey::ec("x")
        };
        assert!(matches!(
            verifier
                .verify(Some(&bearer(&sign(&other, None, &good_claims()))))
                .await,
            Err(AuthError::Invalid(_))
        ));
    }
    let not_pem = pem_file("not a key");
    let err = Verifier::new(&AuthConfig {
        public_key_file: Some(not_pem.0.clone()),
        ..AuthConfig::default()
    })
    .expect_err("not a key");
    assert!(err.to_string().contains("public_key_file"), "{err}");
}

#[tokio::test]
async fn issuer_audience_expiry_and_not_before_are_checked_with_leeway() {
    let key = TestKey::ec("e1");
    let file = pem_file(&key.public_pem);
    let config = AuthConfig {
        public_key_file: Some(file.0.clone()),
        issuer: Some("https://idp.example".into()),
        audience: Some("cachecast".into()),
        leeway: Duration::from_secs(5),
        ..AuthConfig::default()
    };
    let verifier = Verifier::new(&config).expect("configured");
    let base = json!({"sub": "t", "envs": ["dev"], "rights": ["purge_all"],
        "iss": "https://idp.example", "aud": ["other", "cachecast"], "exp": now() + 60});
    let with = |patch: serde_json::Value| {
        let mut claims = base.clone();
        for (k, v) in patch.as_object().expect("object") {
            if v.is_null() {
                claims.as_object_mut().expect("object").remove(k);
            } else {
                claims[k] = v.clone();
            }
        }
        bearer(&sign(&key, None, &claims))
    };
    assert!(verifier.verify(Some(&with(json!({})))).await.is_ok());
    // Expired 2 s ago: within the 5 s leeway. 60 s ago: not.
    assert!(
        verifier
            .verify(Some(&with(json!({"exp": now() - 2}))))
            .await
            .is_ok()
    );
    assert_eq!(
        verifier
            .verify(Some(&with(json!({"exp": now() - 60}))))
            .await,
        Err(AuthError::Expired)
    );
    assert!(
        verifier
            .verify(Some(&with(json!({"nbf": now() + 2}))))
            .await
            .is_ok()
    );
    for (patch, why) in [
        (json!({"nbf": now() + 60}), "nbf"),
        (json!({"iss": "https://evil.example"}), "issuer"),
        (json!({"iss": null}), "iss"),
        (json!({"aud": "someone-else"}), "audience"),
        (json!({"aud": null}), "aud"),
        (json!({"exp": null}), "exp"),
    ] {
        match verifier.verify(Some(&with(patch.clone()))).await {
            Err(AuthError::Invalid(message)) => {
                assert!(message.contains(why), "{patch}: {message}")
            }
            other => panic!("{patch}: {other:?}"),
        }
    }
}

/// A JWKS served by a real local HTTP server, counting its fetches.
struct JwksServer {
    url: String,
    document: Arc<Mutex<serde_json::Value>>,
    fetches: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl JwksServer {
    async fn start(document: serde_json::Value) -> Self {
        let document = Arc::new(Mutex::new(document));
        let fetches = Arc::new(AtomicUsize::new(0));
        let router = axum::Router::new().route(
            "/.well-known/jwks.json",
            axum::routing::get({
                let document = document.clone();
                let fetches = fetches.clone();
                move || {
                    fetches.fetch_add(1, Ordering::SeqCst);
                    let body = document.lock().expect("lock").clone();
                    async move { axum::Json(body) }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!(
            "http://{}/.well-known/jwks.json",
            listener.local_addr().expect("addr")
        );
        let task = tokio::spawn(async move {
            axum::serve(listener, router).await.expect("serves");
        });
        Self {
            url,
            document,
            fetches,
            task,
        }
    }

    fn set(&self, document: serde_json::Value) {
        *self.document.lock().expect("lock") = document;
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn jwks_config(url: &str, min_refresh: Duration) -> AuthConfig {
    AuthConfig {
        jwks_url: Some(url.into()),
        jwks_min_refresh: min_refresh,
        jwks_timeout: Duration::from_secs(2),
        ..AuthConfig::default()
    }
}

#[tokio::test]
async fn jwks_keys_are_fetched_once_and_rotation_is_picked_up() {
    let (k1, k2) = (TestKey::rsa("k1"), TestKey::ec("k2"));
    let server = JwksServer::start(TestKey::jwks(&[&k1])).await;
    // A zero minimum interval: every unknown kid may fetch (rotation is picked up at once).
    let verifier = Verifier::new(&jwks_config(&server.url, Duration::ZERO)).expect("configured");
    assert_eq!(server.fetches(), 0, "building the verifier fetches nothing");
    for _ in 0..5 {
        verifier
            .verify(Some(&bearer(&sign(&k1, Some("k1"), &good_claims()))))
            .await
            .expect("k1 valid");
    }
    assert_eq!(server.fetches(), 1, "known keys are served from the cache");

    // The provider rotates: k2 appears, k1 goes.
    server.set(TestKey::jwks(&[&k2]));
    verifier
        .verify(Some(&bearer(&sign(&k2, Some("k2"), &good_claims()))))
        .await
        .expect("k2 valid after rotation");
    assert_eq!(server.fetches(), 2);
    assert!(
        verifier
            .verify(Some(&bearer(&sign(&k1, Some("k1"), &good_claims()))))
            .await
            .is_err(),
        "a key dropped from the JWKS is no longer accepted"
    );
    // An RS256 token (k1's signature) naming the EC key's kid: the algorithm comes from the key.
    assert!(
        verifier
            .verify(Some(&bearer(&sign(&k1, Some("k2"), &good_claims()))))
            .await
            .is_err()
    );
}

#[tokio::test]
async fn a_flood_of_unknown_kids_costs_one_fetch() {
    let k1 = TestKey::ec("k1");
    let server = JwksServer::start(TestKey::jwks(&[&k1])).await;
    let verifier =
        Verifier::new(&jwks_config(&server.url, Duration::from_secs(3600))).expect("configured");
    let good = bearer(&sign(&k1, Some("k1"), &good_claims()));
    verifier.verify(Some(&good)).await.expect("valid");
    assert_eq!(server.fetches(), 1);
    // 200 concurrent tokens with made-up kids.
    let mut tasks = Vec::new();
    for n in 0..200 {
        let verifier = verifier.clone();
        let token = bearer(&sign(&k1, Some(&format!("made-up-{n}")), &good_claims()));
        tasks.push(tokio::spawn(
            async move { verifier.verify(Some(&token)).await },
        ));
    }
    for task in tasks {
        assert!(matches!(
            task.await.expect("task"),
            Err(AuthError::Invalid(_))
        ));
    }
    assert!(
        server.fetches() <= 2,
        "{} fetches for 200 unknown kids",
        server.fetches()
    );
    // Known keys still work meanwhile.
    verifier.verify(Some(&good)).await.expect("still valid");
}

#[tokio::test]
async fn an_unreachable_jwks_is_a_temporary_failure_and_held_keys_stay_valid() {
    // Nothing listens here.
    let port = cachecast_testkit::free_port();
    let verifier = Verifier::new(&jwks_config(
        &format!("http://127.0.0.1:{port}/jwks.json"),
        Duration::ZERO,
    ))
    .expect("configured");
    let key = TestKey::ec("k1");
    let token = bearer(&sign(&key, Some("k1"), &good_claims()));
    assert!(matches!(
        verifier.verify(Some(&token)).await,
        Err(AuthError::KeysUnavailable(_))
    ));

    // Held keys outlive a provider outage (and a stale cache).
    let server = JwksServer::start(TestKey::jwks(&[&key])).await;
    let config = AuthConfig {
        jwks_max_age: Duration::ZERO,
        ..jwks_config(&server.url, Duration::ZERO)
    };
    let verifier = Verifier::new(&config).expect("configured");
    verifier.verify(Some(&token)).await.expect("valid");
    server.set(json!({"not": "a jwks"}));
    verifier
        .verify(Some(&token))
        .await
        .expect("still valid with the held key");
    assert!(server.fetches() >= 2, "the stale cache was refreshed");
}

#[tokio::test]
async fn symmetric_and_foreign_keys_in_a_jwks_are_ignored() {
    let ec = TestKey::ec("ec");
    // An `oct` key whose secret an attacker knows, with the kid they will name.
    let oct = json!({"kty": "oct", "kid": "oct", "k": "c2VjcmV0", "alg": "HS256"});
    let server = JwksServer::start(json!({"keys": [oct, ec.jwk]})).await;
    let verifier = Verifier::new(&jwks_config(&server.url, Duration::ZERO)).expect("configured");
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("oct".into());
    let forged = jsonwebtoken::encode(
        &header,
        &good_claims(),
        &EncodingKey::from_secret(b"secret"),
    )
    .expect("sign");
    assert!(matches!(
        verifier.verify(Some(&bearer(&forged))).await,
        Err(AuthError::Invalid(_))
    ));
    verifier
        .verify(Some(&bearer(&sign(&ec, Some("ec"), &good_claims()))))
        .await
        .expect("the EC key works");
}
