//! KV tokens reserved by what requests need, on a real server (the test engine, tiny fixture):
//! after short requests a new worker reserves a small context, a request longer than every
//! worker holds is served by a larger worker put in place of the smallest, and the fixed setting
//! keeps every worker at the whole context.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tidepool_tests::{get_json, post_json, start_server, tiny_fixture, ServerOptions};

fn workers(status: &Value) -> Vec<(String, u64, u64)> {
    status["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            (
                w["state"].as_str().unwrap().to_string(),
                w["context_tokens"].as_u64().unwrap(),
                w["kv_cache_bytes"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Polls /admin/status until `done` holds (30 s at most); returns the last status.
async fn status_until(s: &tidepool_tests::TestServer, done: impl Fn(&Value) -> bool) -> Value {
    let started = Instant::now();
    loop {
        let (code, v) = get_json(s.url("/admin/status")).await;
        assert_eq!(code, 200, "{v}");
        if done(&v) {
            return v;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "not reached in 30 s; workers {:?}, events {}",
            workers(&v),
            get_json(s.url("/admin/events")).await.1
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn chat(s: &tidepool_tests::TestServer, max_tokens: u32) -> Value {
    let (code, v) = post_json(
        s.url("/v1/chat/completions"),
        &json!({"messages": [{"role": "user", "content": "Say hello."}],
                "max_tokens": max_tokens, "temperature": 0}),
    )
    .await;
    assert_eq!(code, 200, "{v}");
    v
}

#[tokio::test]
async fn workers_reserve_the_context_requests_need_and_grow_for_a_longer_one() {
    let s = start_server(ServerOptions {
        model: Some(tiny_fixture()),
        slots: 2,
        ..Default::default()
    });
    // Before any request the first worker got the initial size, within the configured range.
    let v = status_until(&s, |_| true).await;
    assert_eq!(v["context_tokens"]["min"], 512, "{v}");
    assert_eq!(v["context_tokens"]["max"], 4096, "{v}");
    let first = workers(&v);
    assert_eq!(first.len(), 1, "{first:?}");
    assert_eq!(first[0].1, 2048, "{first:?}");
    // Short requests: the next worker holds them in the least context.
    for _ in 0..3 {
        chat(&s, 8).await;
    }
    let (_, v) = get_json(s.url("/admin/status")).await;
    assert_eq!(v["context_tokens"]["next"], 512, "{v}");
    let (code, v) = post_json(s.url("/admin/scale"), &json!({"workers": 2, "ttl_s": 600})).await;
    assert_eq!(code, 202, "{v}");
    let v = status_until(&s, |v| {
        let w = workers(v);
        w.len() == 2 && w.iter().all(|w| w.0 == "ready")
    })
    .await;
    let two = workers(&v);
    assert_eq!(two[1].1, 512, "{two:?}");
    // Its KV cache is a quarter of the first one's (2 slots of 512 tokens against 2048), as
    // estimated or, on llama.cpp, as the engine allocated it.
    let ratio = two[1].2 as f64 / two[0].2 as f64;
    assert!((0.2..=0.3).contains(&ratio), "KV {two:?}");

    // A request that may need more than 2100 tokens fits neither: a worker of the whole
    // context takes the smallest one's place, and serves it.
    let v = chat(&s, 2100).await;
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() > 0, "{v}");
    let v = status_until(&s, |v| {
        let w = workers(v);
        w.iter().filter(|w| w.0 == "ready").count() == 2 && w.iter().all(|w| w.0 == "ready")
    })
    .await;
    let contexts: Vec<u64> = workers(&v).iter().map(|w| w.1).collect();
    assert_eq!(contexts, [2048, 4096], "the 512-token worker was replaced");
    let (_, events) = get_json(s.url("/admin/events")).await;
    let said = events.to_string();
    assert!(
        said.contains("a request needs") && said.contains("replaced by a larger worker"),
        "{said}"
    );
    // The next worker is sized for the long request too, while it is among the recent ones.
    let (_, v) = get_json(s.url("/admin/status")).await;
    assert_eq!(v["context_tokens"]["next"], 4096, "{v}");
    s.stop(30);
}
