//! A dead engine is replaced: the real server (in-process, on a pool of the test engine) loses
//! its worker's engine, says it is degraded only while no worker is healthy, and the next
//! request is served by a replacement; a generation whose client stops reading gives its slot
//! back.

use std::time::Duration;

use tidepool_tests::{get_json, post_json, start_server, tiny_fixture, ServerOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_engine_is_replaced_and_the_next_request_succeeds() {
    let server = start_server(ServerOptions {
        model: Some(tiny_fixture()),
        slots: 2,
        pool: Some((16, Duration::from_secs(60))),
        ..Default::default()
    });
    let chat =
        serde_json::json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4});
    let (code, _) = post_json(server.url("/v1/chat/completions"), &chat).await;
    assert_eq!(code, 200);
    let pool = server.service.pool().expect("a pool");
    let first = pool.workers()[0].id;
    // Stop the engine under the pool, as a crash would: its thread is gone.
    pool.any_engine().expect("a worker").shutdown().await;
    let (code, body) = post_json(server.url("/v1/chat/completions"), &chat).await;
    assert_eq!(code, 200, "{body}");
    let workers = pool.workers();
    assert!(workers.iter().all(|w| w.id != first), "{workers:?}");
    assert_eq!(pool.deaths(), 1);
    assert!(pool
        .events()
        .iter()
        .any(|e| e.message.contains("engine died")));
    let (code, health) = get_json(server.url("/health")).await;
    assert_eq!(code, 200, "{health}");
    let (_, status) = get_json(server.url("/admin/status")).await;
    assert_eq!(status["health"]["engine_deaths"], 1, "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_says_degraded_while_no_worker_is_healthy() {
    let server = start_server(ServerOptions {
        model: Some(tiny_fixture()),
        pool: Some((16, Duration::from_secs(60))),
        ..Default::default()
    });
    let pool = server.service.pool().expect("a pool");
    let engine = pool.any_engine().expect("a worker");
    engine.shutdown().await;
    pool.check_health();
    // Set when the worker is taken out, cleared only once its replacement has loaded a model:
    // nothing has loaded in the microseconds since.
    let why = pool
        .degraded()
        .expect("degraded while the replacement loads");
    assert!(why.contains("died"), "{why}");
    let id = pool.workers().iter().map(|w| w.id).max().unwrap();
    tokio::time::timeout(Duration::from_secs(60), pool.wait_ready(id))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(pool.degraded(), None);
    let (code, body) = get_json(server.url("/health")).await;
    assert_eq!(code, 200, "{body}");
    let chat =
        serde_json::json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4});
    let (code, body) = post_json(server.url("/v1/chat/completions"), &chat).await;
    assert_eq!(code, 200, "{body}");
}
