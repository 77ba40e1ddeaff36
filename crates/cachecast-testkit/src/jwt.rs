//! NATS decentralized authentication for tests: an operator, accounts and users as signed
//! JWTs, a `.creds` file, and the server configuration that trusts them (operator mode with a
//! MEMORY resolver).
//!
//! A NATS JWT is `base64url(header).base64url(claims).base64url(signature)`, unpadded, where
//! the header is `{"typ":"JWT","alg":"ed25519-nkey"}` and the signature is the issuer NKey's
//! ed25519 signature of the first two parts. Operators sign accounts, accounts sign users.

use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use nkeys::KeyPair;
use serde_json::{Value, json};

/// Signs `claims` (the `nats` section and the name) as `issuer` about `subject`.
pub fn encode(issuer: &KeyPair, subject: &str, name: &str, nats: Value) -> String {
    let header = json!({"typ": "JWT", "alg": "ed25519-nkey"});
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let claims = json!({
        // Any unique id will do: the server does not check it.
        "jti": KeyPair::new_user().public_key(),
        "iat": now,
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let signature = issuer
        .sign(signing_input.as_bytes())
        .unwrap_or_else(|e| panic!("the issuer key has no seed to sign with: {e}"));
    format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(signature))
}

/// An operator and the accounts it signs.
#[derive(Debug)]
pub struct Operator {
    key: KeyPair,
    jwt: String,
    system: Account,
    accounts: Vec<Account>,
}

/// An account: its key signs its users.
#[derive(Debug)]
pub struct Account {
    key: KeyPair,
    jwt: String,
}

impl Operator {
    /// A new operator with a system account (JetStream needs one in operator mode).
    pub fn new(name: &str) -> Self {
        let key = KeyPair::new_operator();
        let jwt = encode(
            &key,
            &key.public_key(),
            name,
            json!({"type": "operator", "version": 2}),
        );
        let system = Account::signed_by(&key, "SYS", false);
        Self {
            key,
            jwt,
            system,
            accounts: Vec::new(),
        }
    }

    /// Adds an account with JetStream enabled and no limits; returns it.
    pub fn account(&mut self, name: &str) -> &Account {
        let account = Account::signed_by(&self.key, name, true);
        self.accounts.push(account);
        self.accounts.last().expect("just pushed")
    }

    /// The server configuration (to include from a file in `dir`) that trusts this operator
    /// and knows its accounts. Writes the operator JWT to `dir/operator.jwt`.
    pub fn server_config(&self, dir: &Path) -> String {
        let operator_file = dir.join("operator.jwt");
        std::fs::write(&operator_file, &self.jwt)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", operator_file.display()));
        let mut preload = format!("  {}: {}\n", self.system.public_key(), self.system.jwt);
        for account in &self.accounts {
            preload.push_str(&format!("  {}: {}\n", account.public_key(), account.jwt));
        }
        format!(
            "operator: \"{}\"\nsystem_account: {}\nresolver: MEMORY\nresolver_preload: {{\n{preload}}}\n",
            operator_file.display(),
            self.system.public_key()
        )
    }
}

impl Account {
    fn signed_by(operator: &KeyPair, name: &str, jetstream: bool) -> Self {
        let key = KeyPair::new_account();
        let mut limits = json!({
            "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
            "wildcards": true, "conn": -1, "leaf": -1,
        });
        if jetstream {
            limits["mem_storage"] = json!(-1);
            limits["disk_storage"] = json!(-1);
            limits["streams"] = json!(-1);
            limits["consumer"] = json!(-1);
        }
        let jwt = encode(
            operator,
            &key.public_key(),
            name,
            json!({"limits": limits, "type": "account", "version": 2}),
        );
        Self { key, jwt }
    }

    /// The account's public key (`A...`).
    pub fn public_key(&self) -> String {
        self.key.public_key()
    }

    /// A new user of this account, with no permission limits, as `.creds` file contents.
    pub fn user_creds(&self, name: &str) -> String {
        let user = KeyPair::new_user();
        let jwt = encode(
            &self.key,
            &user.public_key(),
            name,
            json!({"pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1, "type": "user", "version": 2}),
        );
        creds(&jwt, &user.seed().expect("a new key has a seed"))
    }
}

/// A `.creds` file as `nsc` writes it: the user JWT and the user's NKey seed.
pub fn creds(jwt: &str, seed: &str) -> String {
    format!(
        "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n\
         ************************* IMPORTANT *************************\n\
         NKEY Seed printed below can be used to sign and prove identity.\n\
         NKEYs are sensitive and should be treated as secrets.\n\n\
         -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n\n\
         *************************************************************\n"
    )
}
