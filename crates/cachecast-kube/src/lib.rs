//! Asks the Kubernetes API about one pod: is it still there, is it the same pod (its UID), is
//! it being deleted.
//!
//! A cache that lives inside a pod (a Redis sidecar of a PAA) ends with that pod. Its agent
//! asks about its own pod when it stops: a pod being deleted takes the cache along, so the
//! agent forgets the cache; a container restart does not. SIGTERM and preStop cannot tell the
//! two apart (a failed liveness probe sends them too); the pod's `deletionTimestamp` can.
//! Publishers ask about the pods of unattended caches, to collect what an agent never had the
//! chance to forget (a lost node, an overrun grace period).

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The `[kubernetes]` configuration section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KubernetesConfig {
    /// The API server (in a cluster: its service address).
    pub api_url: String,
    /// The service account token, read for every call (Kubernetes rotates it).
    pub token_file: PathBuf,
    /// The API server's CA (in a cluster: the service account's); unused for `http://`.
    pub ca_file: Option<PathBuf>,
    /// How long one call may take.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// `cachecast serve`: collect the registrations of pod-lifetime caches whose pod is gone
    /// (needs `get` on pods in their namespaces).
    pub collect_pod_caches: bool,
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        Self {
            api_url: "https://kubernetes.default.svc".into(),
            token_file: "/var/run/secrets/kubernetes.io/serviceaccount/token".into(),
            ca_file: Some("/var/run/secrets/kubernetes.io/serviceaccount/ca.crt".into()),
            timeout: Duration::from_secs(5),
            collect_pod_caches: false,
        }
    }
}

/// One pod, as the downward API names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

/// What the API says about a pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodState {
    /// There, and not being deleted: its containers may restart, its cache stays.
    Running,
    /// Being deleted (`metadata.deletionTimestamp` is set): its cache ends with it.
    Deleting,
    /// Not there, or another pod of the same name (another UID): its cache is gone.
    Gone,
}

/// Why the API could not say.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error(
        "could not read the service account token {path}: {source}; mount it, or set kubernetes.token_file"
    )]
    Token {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("could not read the API server's CA {path}: {reason}; set kubernetes.ca_file")]
    Ca { path: PathBuf, reason: String },
    #[error("the Kubernetes API at {url} did not answer: {source}; check kubernetes.api_url")]
    Unreachable { url: String, source: reqwest::Error },
    #[error(
        "the Kubernetes API answered {status} for pod {namespace}/{name}: {body}; the service account needs `get` on pods"
    )]
    Refused {
        status: u16,
        namespace: String,
        name: String,
        body: String,
    },
}

/// A client for pod lookups.
#[derive(Debug, Clone)]
pub struct Kube {
    client: reqwest::Client,
    config: KubernetesConfig,
}

impl Kube {
    /// Reads the CA (for `https://`); the token is read on every call.
    pub fn new(config: &KubernetesConfig) -> Result<Self, KubeError> {
        let mut builder = reqwest::Client::builder()
            .timeout(config.timeout)
            .redirect(reqwest::redirect::Policy::none());
        if config.api_url.starts_with("https://")
            && let Some(path) = &config.ca_file
        {
            let ca = |reason: String| KubeError::Ca {
                path: path.clone(),
                reason,
            };
            let pem = std::fs::read(path).map_err(|e| ca(e.to_string()))?;
            let cert = reqwest::Certificate::from_pem(&pem).map_err(|e| ca(e.to_string()))?;
            builder = builder.add_root_certificate(cert);
        }
        let client = builder.build().map_err(|source| KubeError::Unreachable {
            url: config.api_url.clone(),
            source,
        })?;
        Ok(Self {
            client,
            config: config.clone(),
        })
    }

    /// Whether `pod` is running, being deleted, or gone.
    pub async fn pod_state(&self, pod: &PodRef) -> Result<PodState, KubeError> {
        let token = tokio::fs::read_to_string(&self.config.token_file)
            .await
            .map_err(|source| KubeError::Token {
                path: self.config.token_file.clone(),
                source,
            })?;
        let url = format!(
            "{}/api/v1/namespaces/{}/pods/{}",
            self.config.api_url.trim_end_matches('/'),
            pod.namespace,
            pod.name
        );
        let unreachable = |source| KubeError::Unreachable {
            url: self.config.api_url.clone(),
            source,
        };
        let response = self
            .client
            .get(&url)
            .bearer_auth(token.trim())
            .send()
            .await
            .map_err(unreachable)?;
        let status = response.status().as_u16();
        if status == 404 {
            return Ok(PodState::Gone);
        }
        let body = response.text().await.map_err(unreachable)?;
        if status != 200 {
            return Err(KubeError::Refused {
                status,
                namespace: pod.namespace.clone(),
                name: pod.name.clone(),
                body: body.chars().take(200).collect(),
            });
        }
        Ok(state_of(&body, &pod.uid))
    }
}

/// The state of the pod resource `body` for the pod whose UID is `uid`. What cannot be read
/// counts as running: it keeps the cache registered, the safe side.
fn state_of(body: &str, uid: &str) -> PodState {
    let pod: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    let metadata = &pod["metadata"];
    if metadata["uid"].as_str().is_some_and(|other| other != uid) {
        PodState::Gone
    } else if metadata["deletionTimestamp"].is_string() {
        PodState::Deleting
    } else {
        PodState::Running
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_is_told_apart_by_uid_and_deletion_timestamp() {
        let pod = |uid: &str, deleting: bool| {
            let mut metadata = serde_json::json!({"name": "paa-0", "uid": uid});
            if deleting {
                metadata["deletionTimestamp"] = "2026-11-30T03:00:00Z".into();
            }
            serde_json::json!({"kind": "Pod", "metadata": metadata}).to_string()
        };
        assert_eq!(state_of(&pod("u1", false), "u1"), PodState::Running);
        assert_eq!(state_of(&pod("u1", true), "u1"), PodState::Deleting);
        assert_eq!(
            state_of(&pod("u2", false), "u1"),
            PodState::Gone,
            "a new pod of that name"
        );
        assert_eq!(
            state_of("not json", "u1"),
            PodState::Running,
            "unreadable: keep the cache"
        );
    }
}
