//! A static public key from a PEM file (`auth.public_key_file`), for identity providers that
//! publish no JWKS: an RSA key verifies RS256 tokens, a P-256 EC key ES256 tokens.

use std::path::Path;

use jsonwebtoken::{Algorithm, DecodingKey};

use super::AuthError;

/// Reads one public key and the algorithm it verifies.
pub(super) fn read_public_key(path: &Path) -> Result<(DecodingKey, Algorithm), AuthError> {
    let pem = std::fs::read(path).map_err(|err| {
        AuthError::Config(format!(
            "auth.public_key_file {}: {err}; point it at a readable PEM public key",
            path.display()
        ))
    })?;
    parse_public_key(&pem).ok_or_else(|| {
        AuthError::Config(format!(
            "auth.public_key_file {} holds no RSA or EC public key in PEM (-----BEGIN PUBLIC KEY-----); export the provider's signing key as PEM",
            path.display()
        ))
    })
}

/// An RSA (RS256) or EC (ES256) public key in PEM.
pub(super) fn parse_public_key(pem: &[u8]) -> Option<(DecodingKey, Algorithm)> {
    if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
        return Some((key, Algorithm::RS256));
    }
    if let Ok(key) = DecodingKey::from_ec_pem(pem) {
        return Some((key, Algorithm::ES256));
    }
    None
}
