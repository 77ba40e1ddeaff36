//! Caches that end with their pod (a Redis sidecar in each PAA pod), with pods run as processes
//! (an agent and a Redis, named and given a UID) and the Kubernetes API answered by a local
//! server that serves pod resources as the real one does, `deletionTimestamp` included.
//!
//! A rolling update replaces every pod: each deleted pod's agent forgets its cache, so once the
//! fleet settles no request is a `424`, and no `200` is answered while an entry survives in a
//! running cache. A container restart keeps the cache registered. A pod lost with its node
//! (its agent never had the chance) is collected by the publisher once the API says it is gone.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use cachecast_e2e::{ChildProcess, RedisCache, Signal, Stack, cachecast_with_env, eventually};
use cachecast_testkit::RedisServer;

const STARTUP: Duration = Duration::from_secs(30);
const EXIT: Duration = Duration::from_secs(15);
const TOKEN: &str = "service-account-token-for-tests";

/// The pods the fake API knows: name to UID and whether it is being deleted.
type Pods = Arc<Mutex<HashMap<String, (String, bool)>>>;

/// A local server answering `GET /api/v1/namespaces/{ns}/pods/{name}` like the Kubernetes API.
async fn kubernetes_api(pods: Pods) -> String {
    async fn pod(
        State(pods): State<Pods>,
        Path((namespace, name)): Path<(String, String)>,
        headers: HeaderMap,
    ) -> (StatusCode, axum::Json<serde_json::Value>) {
        let authorized = headers
            .get("authorization")
            .is_some_and(|v| v.as_bytes() == format!("Bearer {TOKEN}").as_bytes());
        if !authorized {
            let status = serde_json::json!({"kind": "Status", "status": "Failure", "reason": "Unauthorized", "code": 401});
            return (StatusCode::UNAUTHORIZED, axum::Json(status));
        }
        match pods.lock().expect("pods").get(&name) {
            Some((uid, deleting)) => {
                let mut metadata =
                    serde_json::json!({"name": name, "namespace": namespace, "uid": uid});
                if *deleting {
                    metadata["deletionTimestamp"] = "2026-11-30T03:00:00Z".into();
                    metadata["deletionGracePeriodSeconds"] = 30.into();
                }
                let body = serde_json::json!({"kind": "Pod", "apiVersion": "v1", "metadata": metadata, "status": {"phase": "Running"}});
                (StatusCode::OK, axum::Json(body))
            }
            None => {
                let status = serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": format!("pods \"{name}\" not found"), "reason": "NotFound", "code": 404});
                (StatusCode::NOT_FOUND, axum::Json(status))
            }
        }
    }
    let router = axum::Router::new()
        .route(
            "/api/v1/namespaces/{namespace}/pods/{name}",
            axum::routing::get(pod),
        )
        .with_state(pods);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the fake Kubernetes API");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    tokio::spawn(async move { axum::serve(listener, router).await.ok() });
    url
}

/// One pod: its Redis and its agent, named, with a UID.
struct Pod {
    name: String,
    uid: String,
    redis: RedisServer,
    agent: ChildProcess,
}

/// What every pod's agent needs to reach NATS and the Kubernetes API.
struct Cluster {
    nats_url: String,
    api_url: String,
    token_file: tempfile::NamedTempFile,
    pods: Pods,
}

impl Cluster {
    fn agent(&self, name: &str, uid: &str, redis: &RedisServer) -> ChildProcess {
        let token_file = self.token_file.path().to_string_lossy().into_owned();
        cachecast_with_env(
            &self.nats_url,
            &[
                "agent",
                "--env",
                "dev",
                "--id",
                name,
                "--backend",
                "redis",
                "--redis-url",
                &redis.url(),
                "--heartbeat",
                "500ms",
            ],
            &[
                ("CACHECAST_AGENT__CACHE_LIFETIME", "pod"),
                ("CACHECAST_AGENT__POD_NAMESPACE", "paa"),
                ("CACHECAST_AGENT__POD_NAME", name),
                ("CACHECAST_AGENT__POD_UID", uid),
                ("CACHECAST_KUBERNETES__API_URL", &self.api_url),
                ("CACHECAST_KUBERNETES__TOKEN_FILE", &token_file),
            ],
        )
    }

    /// Schedules a pod: the API knows it, its Redis and agent run; returns once it is live.
    async fn start_pod(&self, name: &str, uid: &str) -> Pod {
        self.pods
            .lock()
            .expect("pods")
            .insert(name.to_owned(), (uid.to_owned(), false));
        let redis = cachecast_testkit::redis().await;
        let agent = self.agent(name, uid, &redis);
        agent
            .wait_for_output("agent is live", STARTUP)
            .await
            .unwrap_or_else(|e| panic!("pod {name}: {e}"));
        Pod {
            name: name.to_owned(),
            uid: uid.to_owned(),
            redis,
            agent,
        }
    }

    /// Deletes a pod as Kubernetes does: `deletionTimestamp` set, SIGTERM to the agent (the
    /// last container to stop: a native sidecar), then the pod is gone from the API.
    async fn delete_pod(&self, mut pod: Pod) {
        self.pods
            .lock()
            .expect("pods")
            .insert(pod.name.clone(), (pod.uid.clone(), true));
        pod.agent.signal(Signal::SIGTERM);
        let status = pod.agent.wait_exit(EXIT).await.expect("the agent stops");
        assert!(status.success(), "{}", pod.agent.output());
        assert!(
            pod.agent
                .output()
                .contains("its cache ends with it and is forgotten"),
            "{}",
            pod.agent.output()
        );
        pod.redis.stop().await;
        self.pods.lock().expect("pods").remove(&pod.name);
    }
}

/// Caches an entry of `scope` in every running pod, invalidates the scope, and checks the
/// promise by looking into each cache: a `200` leaves no entry anywhere. Returns the status.
async fn invalidate_and_look(stack: &Stack, pods: &[&Pod], scope: &str) -> u16 {
    let key = format!("pdp:dev:{scope}:u1:a");
    for pod in pods {
        RedisCache::open(&pod.redis.url()).await.set(&[&key]).await;
    }
    let answer = stack
        .invalidate(
            "dev",
            &format!(r#"{{"scopeClientId":"{scope}"}}"#),
            "?timeout=3s",
        )
        .await;
    if answer.status == 200 {
        for pod in pods {
            let keys = RedisCache::open(&pod.redis.url()).await.keys().await;
            assert!(
                !keys.contains(&key),
                "a 200 while {} still holds {key}: {}",
                pod.name,
                answer.body
            );
        }
    }
    answer.status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_update_forgets_each_deleted_pods_cache_and_settles_without_a_424() {
    let stack = Stack::start().await;
    let pods: Pods = Arc::default();
    let token_file = tempfile::NamedTempFile::new().expect("token file");
    std::fs::write(token_file.path(), TOKEN).expect("write the token");
    let cluster = Cluster {
        nats_url: stack.nats.url(),
        api_url: kubernetes_api(pods.clone()).await,
        token_file,
        pods,
    };
    let mut fleet = Vec::new();
    for i in 0..3 {
        fleet.push(
            cluster
                .start_pod(&format!("paa-a-{i}"), &format!("uid-a-{i}"))
                .await,
        );
    }
    stack.wait_for_agents("dev", 3).await;
    assert_eq!(
        invalidate_and_look(&stack, &fleet.iter().collect::<Vec<_>>(), "s0").await,
        200
    );

    // The rollout: a new pod comes up, then an old one is deleted, three times.
    let mut step = 0;
    for i in 0..3 {
        let new = cluster
            .start_pod(&format!("paa-b-{i}"), &format!("uid-b-{i}"))
            .await;
        fleet.push(new);
        let old = fleet.remove(0);
        cluster.delete_pod(old).await;
        step += 1;
        // Mid-rollout answers may be 424 (an agent leaving); never a 200 over a stale entry.
        invalidate_and_look(
            &stack,
            &fleet.iter().collect::<Vec<_>>(),
            &format!("roll{step}"),
        )
        .await;
    }

    // Settled: three caches, every request confirmed by each.
    stack.wait_for_agents("dev", 3).await;
    let env = cachecast_e2e::env_id("dev");
    eventually("only the new pods' caches are registered", EXIT, || {
        let caches = stack.publisher.caches(&env);
        async move {
            caches.len() == 3
                && caches
                    .iter()
                    .all(|c| c.id.as_str().starts_with("pod-uid-b-"))
        }
    })
    .await;
    for n in 0..3 {
        let status = invalidate_and_look(
            &stack,
            &fleet.iter().collect::<Vec<_>>(),
            &format!("settled{n}"),
        )
        .await;
        assert_eq!(status, 200, "no 424 once the rollout settled");
    }

    // A container restart (not a deletion) keeps the cache: unattended, then caught up.
    let pod = &mut fleet[0];
    pod.agent.kill().await;
    stack.wait_for_agents("dev", 2).await;
    let key = "pdp:dev:restart:u1:a";
    let mut cache = RedisCache::open(&pod.redis.url()).await;
    cache.set(&[key]).await;
    let answer = stack
        .invalidate("dev", r#"{"scopeClientId":"restart"}"#, "?timeout=1s")
        .await;
    assert_eq!(answer.status, 424, "{}", answer.body);
    assert_eq!(answer.body["_nodes"]["failures"][0]["type"], "unattended");
    assert!(
        cache.keys().await.contains(&key.to_owned()),
        "not applied, and the 424 says so"
    );
    pod.agent = cluster.agent(&pod.name, &pod.uid, &pod.redis);
    pod.agent
        .wait_for_output("agent is live", STARTUP)
        .await
        .unwrap_or_else(|e| panic!("restarted agent: {e}"));
    assert!(
        !cache.keys().await.contains(&key.to_owned()),
        "caught up before going live"
    );

    // A pod lost with its node: its agent never forgot the cache; the publisher collects it
    // once the API says the pod is gone.
    let mut lost = fleet.remove(2);
    lost.agent.kill().await;
    lost.redis.stop().await;
    cluster.pods.lock().expect("pods").remove(&lost.name);
    stack.wait_for_agents("dev", 2).await;
    let answer = stack
        .invalidate("dev", r#"{"scopeClientId":"lost"}"#, "?timeout=1s")
        .await;
    assert_eq!(answer.status, 424, "{}", answer.body);
    let kube = cachecast_agent::Kube::new(&cachecast_agent::KubernetesConfig {
        api_url: cluster.api_url.clone(),
        token_file: cluster.token_file.path().to_owned(),
        ..Default::default()
    })
    .expect("Kubernetes client");
    let collector = {
        let publisher = stack.publisher.clone();
        tokio::spawn(async move {
            publisher
                .collect_pod_caches(kube, Duration::from_millis(200))
                .await
        })
    };
    eventually("the lost pod's cache is collected", EXIT, || {
        let caches = stack.publisher.caches(&env);
        async move { caches.len() == 2 }
    })
    .await;
    collector.abort();
    let status = invalidate_and_look(&stack, &fleet.iter().collect::<Vec<_>>(), "after-loss").await;
    assert_eq!(status, 200);
}
