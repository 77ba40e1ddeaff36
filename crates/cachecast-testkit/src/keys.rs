//! Test-only signing keys, generated at run time (no private key is ever committed).
//!
//! [`TestKey::rsa`] and [`TestKey::ec`] give a fresh RS256 / ES256 key pair with its private
//! key in PEM (for signing tokens), its public key in PEM (for `auth.public_key_file`) and as a
//! JWK with a `kid` (for a JWKS a test serves).

use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey};
use p256::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};

/// A generated key pair.
#[derive(Debug, Clone)]
pub struct TestKey {
    /// `RS256` or `ES256`.
    pub alg: Algorithm,
    /// The key id in its JWK.
    pub kid: String,
    /// PKCS#8 private key in PEM.
    pub private_pem: String,
    /// SubjectPublicKeyInfo in PEM.
    pub public_pem: String,
    /// The public key as a JWK, with `kid`, `alg` and `use: sig`.
    pub jwk: serde_json::Value,
}

impl TestKey {
    /// A fresh 2048-bit RSA key (RS256).
    pub fn rsa(kid: &str) -> TestKey {
        let private = rsa::RsaPrivateKey::new(&mut rand_core_06::OsRng, 2048).expect("RSA key");
        let private_pem = private
            .to_pkcs8_pem(LineEnding::LF)
            .expect("RSA PEM")
            .to_string();
        let public_pem = private
            .to_public_key()
            .to_public_key_pem(LineEnding::LF)
            .expect("RSA public PEM");
        Self::finish(Algorithm::RS256, kid, private_pem, public_pem)
    }

    /// A fresh P-256 key (ES256).
    pub fn ec(kid: &str) -> TestKey {
        let private = p256::SecretKey::random(&mut rand_core_06::OsRng);
        let private_pem = private
            .to_pkcs8_pem(LineEnding::LF)
            .expect("EC PEM")
            .to_string();
        let public_pem = private
            .public_key()
            .to_public_key_pem(LineEnding::LF)
            .expect("EC public PEM");
        Self::finish(Algorithm::ES256, kid, private_pem, public_pem)
    }

    fn finish(alg: Algorithm, kid: &str, private_pem: String, public_pem: String) -> TestKey {
        let encoding = match alg {
            Algorithm::RS256 => EncodingKey::from_rsa_pem(private_pem.as_bytes()),
            _ => EncodingKey::from_ec_pem(private_pem.as_bytes()),
        }
        .expect("encoding key");
        let mut jwk = Jwk::from_encoding_key(&encoding, alg).expect("JWK");
        jwk.common.key_id = Some(kid.to_owned());
        jwk.common.public_key_use = Some(jsonwebtoken::jwk::PublicKeyUse::Signature);
        TestKey {
            alg,
            kid: kid.to_owned(),
            private_pem,
            public_pem,
            jwk: serde_json::to_value(jwk).expect("JWK as JSON"),
        }
    }

    /// A JWKS document holding `keys`.
    pub fn jwks(keys: &[&TestKey]) -> serde_json::Value {
        serde_json::json!({ "keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>() })
    }
}
