//! Degraded mode under a forced backlog: the one slot is held by a long generation, requests
//! queue, and past the threshold standard requests get the short answer (capped tokens, the hint
//! in the system prompt), say so in a header, and /metrics counts them; interactive requests and
//! requests below the threshold are untouched.

use serde_json::{json, Value};
use tidepool_gateway::degrade::DegradedConfig;
use tidepool_gateway::gateway::GatewayConfig;
use tidepool_tests::{get_json, start_server, tiny_fixture, ServerOptions, TestServer};

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

fn body(text: &str) -> Value {
    json!({"messages": [{"role": "user", "content": text}], "max_tokens": 200, "temperature": 0})
}

async fn queue_depth(s: &TestServer) -> u64 {
    let v: Value = get_json(s.url("/admin/status")).await.1;
    v["queue"]
        .as_object()
        .unwrap()
        .values()
        .map(|d| d.as_u64().unwrap())
        .sum()
}

async fn wait_for_queue(s: &TestServer, depth: u64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while queue_depth(s).await < depth {
        assert!(
            std::time::Instant::now() < deadline,
            "the queue never reached {depth}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn standard_requests_past_the_backlog_threshold_get_short_answers() {
    let s = start_server(ServerOptions {
        model: Some(tiny_fixture()),
        slots: 1,
        pool: Some((8, std::time::Duration::from_secs(60))),
        gateway: GatewayConfig {
            degraded: DegradedConfig {
                backlog_threshold: Some(1),
                max_tokens: 4,
                hint: "Be very brief.".into(),
            },
            ..ServerOptions::default().gateway
        },
        ..Default::default()
    });
    // The only slot is held by a long generation.
    let mut holder = client()
        .post(s.url("/v1/chat/completions"))
        .json(
            &json!({"messages": [{"role": "user", "content": "long"}], "max_tokens": 3000,
                      "stream": true, "temperature": 0}),
        )
        .send()
        .await
        .unwrap();
    assert!(holder.chunk().await.unwrap().is_some());

    // Backlog 0: the first waiting request is served in full.
    let full = tokio::spawn(
        client()
            .post(s.url("/v1/chat/completions"))
            .json(&body("first"))
            .send(),
    );
    wait_for_queue(&s, 1).await;
    // Backlog 1: standard requests are degraded, on both APIs; interactive ones are not.
    let short = tokio::spawn(
        client()
            .post(s.url("/v1/chat/completions"))
            .json(&body("second"))
            .send(),
    );
    wait_for_queue(&s, 2).await;
    let short_ollama = tokio::spawn(
        client()
            .post(s.url("/api/chat"))
            .json(&json!({"model": "tiny-q8_0", "stream": false,
                          "messages": [{"role": "user", "content": "third"}],
                          "options": {"num_predict": 200, "temperature": 0}}))
            .send(),
    );
    wait_for_queue(&s, 3).await;
    let interactive = tokio::spawn(
        client()
            .post(s.url("/v1/chat/completions"))
            .header("x-tidepool-priority", "interactive")
            .json(&body("fourth"))
            .send(),
    );
    wait_for_queue(&s, 4).await;
    drop(holder);

    let r = full.await.unwrap().unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("x-tidepool-degraded").is_none());

    let r = short.await.unwrap().unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-tidepool-degraded"], "true");
    let v: Value = r.json().await.unwrap();
    assert!(
        v["usage"]["completion_tokens"].as_u64().unwrap() <= 4,
        "{v}"
    );
    // The hint became the system prompt: the same prompt as sending it ourselves.
    let same: Value = client()
        .post(s.url("/v1/chat/completions"))
        .json(
            &json!({"messages": [{"role": "system", "content": "Be very brief."},
                                   {"role": "user", "content": "second"}], "max_tokens": 1}),
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        v["usage"]["prompt_tokens"], same["usage"]["prompt_tokens"],
        "{v} {same}"
    );

    let r = short_ollama.await.unwrap().unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-tidepool-degraded"], "true");
    let v: Value = r.json().await.unwrap();
    assert!(v["eval_count"].as_u64().unwrap() <= 4, "{v}");

    let r = interactive.await.unwrap().unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("x-tidepool-degraded").is_none());

    let metrics = client()
        .get(s.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("tidepool_degraded_total 2\n"), "{metrics}");
    s.stop(30);
}
