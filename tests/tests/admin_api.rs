//! The admin API on a pooled server with real workers on the tiny fixture.

use serde_json::{json, Value};
use tidepool_tests::{get_json, start_server, tiny_fixture, ServerOptions};

fn pooled() -> tidepool_tests::TestServer {
    start_server(ServerOptions {
        model: Some(tiny_fixture()),
        slots: 1,
        pool: Some((4, std::time::Duration::from_secs(10))),
        ..Default::default()
    })
}

#[tokio::test]
async fn status_scale_and_events() {
    let s = pooled();
    let (code, v) = get_json(s.url("/admin/status")).await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["workers"].as_array().unwrap().len(), 1);
    assert_eq!(v["workers"][0]["state"], "ready");
    assert_eq!(v["workers"][0]["slots_total"], 1);
    // Each worker says which library runs it.
    let backend = match tidepool_tests::test_engine() {
        tidepool_engine::choice::EngineKind::MistralRs => "mistral.rs",
        tidepool_engine::choice::EngineKind::LlamaCpp => "llama.cpp",
    };
    assert_eq!(v["workers"][0]["backend"], backend, "{v}");
    assert_eq!(v["queue"]["interactive"], 0);
    // The real budget of this machine, which holds at least the worker that runs.
    assert!(
        v["memory"]["budget_bytes"].as_u64().unwrap()
            >= v["memory"]["reserved_bytes"].as_u64().unwrap(),
        "{v}"
    );
    assert!(v["memory"]["process_rss_bytes"].as_u64().unwrap() > 0);
    assert_eq!(v["policy"]["max_workers"], 2);

    // Manual override to two workers: the second loads and serves.
    let c = reqwest::Client::new();
    let r = c
        .post(s.url("/admin/scale"))
        .json(&json!({"workers": 2, "ttl_s": 60}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["decision"]["workers"], 2);
    assert!(v["decision"]["reason"]
        .as_str()
        .unwrap()
        .contains("manual override"));
    let mut ready = 0;
    for _ in 0..250 {
        let (_, v) = get_json(s.url("/admin/status")).await;
        ready = v["workers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|w| w["state"] == "ready")
            .count();
        if ready == 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(ready, 2);
    let (_, v) = get_json(s.url("/admin/events")).await;
    let events = v["events"].as_array().unwrap();
    assert!(
        events
            .iter()
            .any(|e| e["to"] == "ready" && e["worker"] == 2),
        "{v}"
    );

    // The live policy: read, change, and a bad value refused naming its key.
    let (code, v) = get_json(s.url("/admin/config")).await;
    assert_eq!(code, 200);
    assert_eq!(v["policy"]["max_workers"], 2);
    let r = c
        .put(s.url("/admin/config"))
        .json(&json!({"policy": {"max_workers": 3, "down": {"stabilization_s": 60}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (_, v) = get_json(s.url("/admin/status")).await;
    assert_eq!(v["policy"]["max_workers"], 3);
    assert_eq!(v["policy"]["down"]["stabilization_s"], 60.0);
    let r = c
        .put(s.url("/admin/config"))
        .json(&json!({"policy": {"min_workers": 5, "max_workers": 3}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["param"], "policy.min_workers");

    // Bad override and bad priority header: 400 naming the field.
    let r = c
        .post(s.url("/admin/scale"))
        .json(&json!({"workers": 1, "ttl_s": -1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["param"], "ttl_s");
    let r = c
        .post(s.url("/v1/chat/completions"))
        .header("x-tidepool-priority", "urgent")
        .json(&json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["param"], "x-tidepool-priority");
    let r = c
        .post(s.url("/v1/chat/completions"))
        .header("x-tidepool-priority", "interactive")
        .json(&json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    s.stop(30);
}

#[tokio::test]
async fn admin_needs_a_pool() {
    // A model still loading has no pool yet: 503, not a panic.
    let s = start_server(ServerOptions::default());
    let (code, v) = get_json(s.url("/admin/status")).await;
    assert_eq!(code, 503);
    assert!(v["error"]["message"].as_str().unwrap().contains("pool"));
    s.stop(10);
}

#[tokio::test]
async fn metrics_count_outcomes_tokens_and_pool_state() {
    let s = pooled();
    let c = reqwest::Client::new();
    let r = c
        .post(s.url("/v1/chat/completions"))
        .json(&json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 3}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    let completion = v["usage"]["completion_tokens"].as_u64().unwrap();
    let r = c.get(s.url("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/openmetrics-text"));
    let text = r.text().await.unwrap();
    assert!(text.ends_with("# EOF\n"), "{text}");
    assert!(
        text.contains("tidepool_requests_total{outcome=\"ok\"} 1\n"),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "tidepool_tokens_total{{kind=\"completion\"}} {completion}\n"
        )),
        "{text}"
    );
    assert!(
        text.contains("tidepool_request_duration_seconds_count 1\n"),
        "{text}"
    );
    assert!(
        text.contains("tidepool_workers{state=\"ready\"} 1\n"),
        "{text}"
    );
    assert!(
        text.contains("tidepool_queue_depth{class=\"batch\"} 0\n"),
        "{text}"
    );
    let budget = text
        .lines()
        .find_map(|l| l.strip_prefix("tidepool_memory_budget_bytes "))
        .and_then(|v| v.parse::<u64>().ok());
    assert!(budget.is_some_and(|b| b > 0), "{text}");
    s.stop(30);
}

async fn ready_workers(s: &tidepool_tests::TestServer) -> usize {
    let (_, v) = get_json(s.url("/admin/status")).await;
    v["workers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["state"] == "ready")
        .count()
}

async fn wait_for_workers(s: &tidepool_tests::TestServer, n: usize, secs: u64) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while std::time::Instant::now() < deadline {
        if ready_workers(s).await == n {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test]
async fn a_burst_brings_a_second_worker_idle_drains_it_scale_to_zero_and_cold_start() {
    use tidepool_control::policy::{DownRules, PolicyConfig, UpRules};
    let s = start_server(ServerOptions {
        model: Some(tiny_fixture()),
        slots: 1,
        pool: Some((64, std::time::Duration::from_secs(30))),
        policy: Some(PolicyConfig {
            min_workers: 0,
            max_workers: 2,
            idle_ttl_s: 4.0,
            up: UpRules {
                rate_per_worker: 1.0,
                window_s: 0.4,
                ..UpRules::default()
            },
            down: DownRules {
                stabilization_s: 1.0,
            },
            ..PolicyConfig::default()
        }),
        ..Default::default()
    });
    assert_eq!(ready_workers(&s).await, 1);
    // A burst well over what one worker serves (long answers, 50 a second): requests queue, and
    // a second worker comes up and serves, whether the policy has measured the first one's
    // capacity yet or sizes by `rate_per_worker`. The end-of-text tokens are banned, so every
    // answer is 512 tokens long (a random model that ends early would make the burst light
    // enough for one worker, which the policy, measuring it, rightly keeps).
    let no_end: serde_json::Map<String, serde_json::Value> = (1000..1024)
        .map(|id| (id.to_string(), json!(-100)))
        .collect();
    let c = reqwest::Client::new();
    let mut burst = Vec::new();
    for _ in 0..40 {
        let (c, no_end) = (c.clone(), no_end.clone());
        let url = s.url("/v1/chat/completions");
        burst.push(tokio::spawn(async move {
            c.post(url)
                .json(
                    &json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 512,
                              "logit_bias": no_end}),
                )
                .send()
                .await
                .unwrap()
                .status()
        }));
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    if !wait_for_workers(&s, 2, 40).await {
        // Say what the policy decided and why, for whoever reads the failure.
        let (_, status) = get_json(s.url("/admin/status")).await;
        let (_, events) = get_json(s.url("/admin/events")).await;
        panic!(
            "no second worker; decision {} throughput {} sequence cap {}; events {events}",
            status["decision"], status["throughput"], status["sequence_cap"]
        );
    }
    for b in burst {
        assert_eq!(b.await.unwrap(), 200);
    }
    let (_, v) = get_json(s.url("/admin/events")).await;
    assert!(
        v["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["worker"] == 2 && e["message"].as_str().unwrap().contains("scale up")),
        "{v}"
    );
    // Idle: back to one, then to zero after the idle TTL.
    assert!(wait_for_workers(&s, 1, 20).await, "did not drain to one");
    assert!(wait_for_workers(&s, 0, 45).await, "did not scale to zero");
    // At zero nothing stays reserved; on llama.cpp the weights are unloaded with the last
    // worker.
    let memory = |v: &serde_json::Value| v["memory"].clone();
    let (_, v) = get_json(s.url("/admin/status")).await;
    assert_eq!(memory(&v)["reserved_bytes"], 0, "{v}");
    assert_eq!(memory(&v)["shared_weights_bytes"], 0, "{v}");
    // Cold start: the next request waits for a worker and is served.
    let r = c
        .post(s.url("/v1/chat/completions"))
        .json(&json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(ready_workers(&s).await, 1);
    // The weights are back (counted once, shared, on llama.cpp).
    let (_, v) = get_json(s.url("/admin/status")).await;
    let shared = memory(&v)["shared_weights_bytes"].as_u64().unwrap();
    assert_eq!(
        shared > 0,
        tidepool_tests::test_engine() == tidepool_engine::choice::EngineKind::LlamaCpp,
        "{v}"
    );
    assert!(
        memory(&v)["reserved_bytes"].as_u64().unwrap() > shared,
        "{v}"
    );
    s.stop(30);
}
