//! The Redis store over a real local Redis Cluster (three masters started by the test): records
//! spread over the slots, replays across instances, round trips, and a master going down.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::routing::post;
use http::{Request, StatusCode};
use http_body_util::BodyExt as _;
use idem_runtime::fingerprint::{RecordKey, Scope};
use idem_runtime::key::IdempotencyKey;
use idem_runtime::store::{RedisClusterStore, RedisConfig, RedisStore, Store, TieredStore};
use idem_runtime::{Idempotency, idempotent};
use idem_tests::redis::RedisCluster;
use tower::ServiceExt as _;

#[idempotent(required = true)]
async fn create(State(runs): State<Arc<AtomicUsize>>, body: String) -> (StatusCode, String) {
    let run = runs.fetch_add(1, Ordering::SeqCst) + 1;
    (StatusCode::CREATED, format!("{body} run {run}"))
}

struct App {
    router: Router,
    store: Arc<TieredStore<RedisClusterStore>>,
}

async fn app(cluster: &RedisCluster, runs: &Arc<AtomicUsize>) -> App {
    let config = RedisConfig::new().response_timeout(Duration::from_millis(500));
    let redis = RedisStore::connect_cluster(cluster.urls(), config)
        .await
        .unwrap();
    let store = Arc::new(TieredStore::new(redis));
    let idem = Idempotency::builder()
        .shared_store(Arc::clone(&store) as Arc<dyn Store>)
        .lease(Duration::from_millis(500))
        .build();
    let router = Router::new()
        .route("/create", post(create))
        .layer(idem.layer())
        .with_state(Arc::clone(runs));
    App { router, store }
}

async fn send(app: &App, key: &str, body: &str) -> (StatusCode, bool, String) {
    let request = Request::post("/create")
        .header("idempotency-key", key)
        .body(Body::from(body.to_owned()))
        .unwrap();
    let response = app.router.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let replayed = response.headers().contains_key("idempotent-replayed");
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, replayed, String::from_utf8(body.to_vec()).unwrap())
}

fn evalsha(cluster: &RedisCluster) -> u64 {
    cluster.command_calls().get("evalsha").copied().unwrap_or(0)
}

/// The index of the master holding the record of client key `key`: the only one that answers
/// for it (the others redirect with `MOVED`).
fn owner_node(cluster: &RedisCluster, key: &str) -> usize {
    let record = RecordKey::new(
        &Scope::NONE,
        &IdempotencyKey::parse_bytes(key.as_bytes()).unwrap(),
    );
    let name = RedisStore::key_name(&record);
    cluster
        .nodes()
        .iter()
        .position(|node| {
            node.try_query::<bool>(redis::cmd("EXISTS").arg(&name))
                .is_ok()
        })
        .unwrap_or_else(|| panic!("no master answers for {name}"))
}

/// Records written by the spread test.
const KEYS: usize = 30;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_serves_a_fleet() {
    let mut cluster = RedisCluster::start();
    let runs = Arc::new(AtomicUsize::new(0));
    let a = app(&cluster, &runs).await;
    let b = app(&cluster, &runs).await;

    // Records spread over the slots of every master.
    for i in 0..KEYS {
        let (status, replayed, _) = send(&a, &format!("key-{i}"), &format!("order {i}")).await;
        assert_eq!(status, StatusCode::CREATED);
        assert!(!replayed);
    }
    assert_eq!(runs.load(Ordering::SeqCst), KEYS);
    let mut slots = std::collections::HashSet::new();
    for node in cluster.nodes() {
        let keys: Vec<String> = node.query(redis::cmd("KEYS").arg("*"));
        assert!(!keys.is_empty(), "a master holds no record");
        for name in keys {
            assert!(
                name.starts_with("idem:v2:{") && name.len() == 8 + 66,
                "{name}"
            );
            let slot: u16 = node.query(redis::cmd("CLUSTER").arg("KEYSLOT").arg(&name));
            slots.insert(slot);
        }
    }
    assert_eq!(slots.len(), KEYS, "one slot per record");

    // Replays across instances, from the cluster.
    for i in 0..KEYS {
        let (status, replayed, body) = send(&b, &format!("key-{i}"), &format!("order {i}")).await;
        assert_eq!(status, StatusCode::CREATED);
        assert!(replayed);
        assert!(body.starts_with(&format!("order {i} run ")), "{body}");
    }
    assert_eq!(runs.load(Ordering::SeqCst), KEYS);

    // Round trips: 2 for a first execution, 1 for a replay from the cluster (which caches the
    // record on that instance), 0 from moka.
    let before = evalsha(&cluster);
    send(&a, "rt", "x").await;
    let first = evalsha(&cluster);
    assert_eq!(first - before, 2);
    assert!(send(&b, "rt", "x").await.1);
    assert_eq!(evalsha(&cluster) - first, 1);
    assert!(send(&b, "rt", "x").await.1);
    assert_eq!(evalsha(&cluster) - first, 1);
    assert_eq!(b.store.stats().misses, KEYS as u64 + 1);

    // A master goes down: only its records fail (503), within the budget; the rest still work.
    let down_key = (0..1000)
        .map(|i| format!("down-{i}"))
        .find(|k| owner_node(&cluster, k) == 0)
        .unwrap();
    let up_key = (0..1000)
        .map(|i| format!("up-{i}"))
        .find(|k| owner_node(&cluster, k) != 0)
        .unwrap();
    cluster.node_mut(0).kill();
    let runs_before = runs.load(Ordering::SeqCst);
    let started = Instant::now();
    let (status, _, body) = send(&a, &down_key, "x").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        body.contains("/problems/store-unavailable"),
        "a store-unavailable problem: {body}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        runs.load(Ordering::SeqCst),
        runs_before,
        "the handler did not run for the down shard's key"
    );
    let (status, _, _) = send(&a, &up_key, "x").await;
    assert_eq!(
        status,
        StatusCode::CREATED,
        "the other masters keep serving"
    );

    // It comes back (empty, same slots): the same stores recover.
    cluster.node_mut(0).restart();
    cluster.wait_ok();
    let since = Instant::now();
    loop {
        let (status, _, _) = send(&a, &down_key, "x").await;
        if status == StatusCode::CREATED {
            break;
        }
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(since.elapsed() < Duration::from_secs(10), "never recovered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        send(&b, &down_key, "x").await.1,
        "replayed across instances"
    );
}
