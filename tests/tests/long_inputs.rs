//! Long inputs end to end: past the context budget a request is rejected with a clear 400 (the
//! default policy) or, with `on_overflow = "truncate"`, answered from a conversation cut in the
//! middle, reported by a header and in `usage` (OpenAI) or the final object (Ollama).

use serde_json::{json, Value};
use tidepool_gateway::answer_cache::CacheConfig;
use tidepool_gateway::context_fit::{ContextConfig, Overflow};
use tidepool_gateway::gateway::GatewayConfig;
use tidepool_tests::{start_server, tiny_fixture, ServerOptions, TestServer};

const BUDGET: u32 = 256;

fn server(on_overflow: Overflow) -> TestServer {
    start_server(ServerOptions {
        model: Some(tiny_fixture()),
        gateway: GatewayConfig {
            cache: CacheConfig {
                enabled: false,
                ..CacheConfig::default()
            },
            context: ContextConfig {
                budget_tokens: Some(BUDGET),
                on_overflow,
                keep_head: 1,
            },
            ..GatewayConfig::default()
        },
        ..Default::default()
    })
}

/// A system prompt and `n` alternating turns of a dozen words each.
fn conversation(n: usize) -> Value {
    let mut v = vec![json!({"role": "system", "content": "You are a terse assistant."})];
    for i in 0..n {
        let role = if i % 2 == 0 { "user" } else { "assistant" };
        v.push(json!({"role": role, "content": format!(
            "Turn {i}: the tide came in over the rocks and the pools filled with water again.")}));
    }
    Value::Array(v)
}

async fn post(s: &TestServer, path: &str, body: Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(s.url(path))
        .json(&body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn reject_is_the_default_and_says_why() {
    let s = server(Overflow::Reject);
    let r = post(
        &s,
        "/v1/chat/completions",
        json!({"messages": conversation(30), "max_tokens": 16}),
    )
    .await;
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "context_length_exceeded", "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("256") && msg.contains("max_tokens"), "{msg}");

    // Ollama's shape for the same refusal.
    let r = post(
        &s,
        "/api/chat",
        json!({"model": "tiny-q8_0", "messages": conversation(30), "stream": false,
               "options": {"num_predict": 16}}),
    )
    .await;
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert!(
        v["error"].as_str().unwrap().contains("context budget"),
        "{v}"
    );

    // max_tokens alone past the budget.
    let r = post(
        &s,
        "/v1/chat/completions",
        json!({"messages": conversation(1), "max_tokens": 300}),
    )
    .await;
    assert_eq!(r.status(), 400);

    // With no max_tokens, the answer may use what the prompt leaves of the budget (here less
    // than the room an open answer gets by default, half the budget).
    let r = post(
        &s,
        "/v1/chat/completions",
        json!({"messages": conversation(5), "temperature": 0}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    let (prompt, completion) = (
        v["usage"]["prompt_tokens"].as_u64().unwrap(),
        v["usage"]["completion_tokens"].as_u64().unwrap(),
    );
    assert!(prompt > (BUDGET / 2) as u64, "{v}");
    assert!(prompt + completion <= BUDGET as u64, "{v}");

    // A short request passes untouched.
    let r = post(
        &s,
        "/v1/chat/completions",
        json!({"messages": conversation(2), "max_tokens": 8}),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("x-tidepool-truncated").is_none());
    s.stop(30);
}

#[tokio::test]
async fn truncate_keeps_what_fits_and_reports_it() {
    let s = server(Overflow::Truncate);
    let r = post(
        &s,
        "/v1/chat/completions",
        json!({"messages": conversation(30), "max_tokens": 16, "temperature": 0}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let dropped: usize = r.headers()["x-tidepool-truncated"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let v: Value = r.json().await.unwrap();
    let t = &v["usage"]["tidepool_truncation"];
    assert_eq!(t["dropped_messages"], dropped, "{v}");
    assert!(dropped > 0 && dropped < 30, "{v}");
    let original = t["original_prompt_tokens"].as_u64().unwrap();
    let prompt = v["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(original + 16 > BUDGET as u64, "{v}");
    assert!(prompt + 16 <= BUDGET as u64, "{v}");
    // The search keeps as much as fits: one more message would not have.
    assert!(prompt + 16 + 20 > BUDGET as u64, "{v}");

    // Streaming: the header, and the truncation in the usage chunk.
    let r = post(
        &s,
        "/v1/chat/completions",
        json!({"messages": conversation(30), "max_tokens": 16, "stream": true,
               "stream_options": {"include_usage": true}}),
    )
    .await;
    assert_eq!(
        r.headers()["x-tidepool-truncated"],
        dropped.to_string().as_str()
    );
    let text = r.text().await.unwrap();
    let usage_line = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|l| *l != "[DONE]")
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|c| c["usage"].is_object())
        .unwrap();
    assert_eq!(
        usage_line["usage"]["tidepool_truncation"]["dropped_messages"],
        dropped
    );

    // Ollama: header and the final object.
    let r = post(
        &s,
        "/api/chat",
        json!({"model": "tiny-q8_0", "messages": conversation(30), "stream": false,
               "options": {"num_predict": 16, "temperature": 0}}),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["x-tidepool-truncated"],
        dropped.to_string().as_str()
    );
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["tidepool_truncation"]["dropped_messages"], dropped, "{v}");
    assert!(v["prompt_eval_count"].as_u64().unwrap() + 16 <= BUDGET as u64);

    // Text prompts are never cut.
    let r = post(
        &s,
        "/v1/completions",
        json!({"prompt": "tide ".repeat(400), "max_tokens": 16}),
    )
    .await;
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("never truncated"));

    // A last message that alone exceeds the budget cannot be saved.
    let r = post(
        &s,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "tide pool ".repeat(300)}], "max_tokens": 16}),
    )
    .await;
    assert_eq!(r.status(), 400);
    s.stop(30);
}
