//! Certificates for TLS tests: a throw-away certificate authority, a server certificate for
//! 127.0.0.1 and `localhost`, and client certificates, written as PEM files into a directory.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

/// A certificate authority that signs server and client certificates into `dir`.
#[derive(Debug)]
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    dir: PathBuf,
    /// The CA certificate (PEM), to trust.
    pub ca_file: PathBuf,
}

/// A certificate and its key, as PEM files.
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

fn write(path: &Path, contents: &str) {
    std::fs::write(path, contents)
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

fn key() -> KeyPair {
    KeyPair::generate().unwrap_or_else(|e| panic!("cannot generate a key: {e}"))
}

impl TestCa {
    /// A new CA named `name`; its certificate goes to `dir/<name>.pem`.
    pub fn new(dir: &Path, name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("no names");
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = key();
        let cert = params
            .self_signed(&key)
            .unwrap_or_else(|e| panic!("cannot self-sign the CA: {e}"));
        let ca_file = dir.join(format!("{name}.pem"));
        write(&ca_file, &cert.pem());
        Self {
            issuer: Issuer::new(params, key),
            dir: dir.to_owned(),
            ca_file,
        }
    }

    fn sign(&self, name: &str, sans: Vec<String>, usage: ExtendedKeyUsagePurpose) -> CertFiles {
        let mut params = CertificateParams::new(sans)
            .unwrap_or_else(|e| panic!("invalid certificate names: {e}"));
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![usage];
        let key = key();
        let cert = params
            .signed_by(&key, &self.issuer)
            .unwrap_or_else(|e| panic!("cannot sign {name}: {e}"));
        let files = CertFiles {
            cert_file: self.dir.join(format!("{name}.pem")),
            key_file: self.dir.join(format!("{name}-key.pem")),
        };
        write(&files.cert_file, &cert.pem());
        write(&files.key_file, &key.serialize_pem());
        files
    }

    /// A server certificate for 127.0.0.1 and `localhost`.
    pub fn server(&self, name: &str) -> CertFiles {
        self.sign(
            name,
            vec!["127.0.0.1".into(), "localhost".into()],
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    /// A client certificate (for mutual TLS).
    pub fn client(&self, name: &str) -> CertFiles {
        self.sign(
            name,
            vec![format!("{name}.cachecast.test")],
            ExtendedKeyUsagePurpose::ClientAuth,
        )
    }
}
