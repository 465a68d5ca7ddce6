//! The answer cache end to end: a repeated deterministic request is a hit with the same body,
//! through both APIs, streaming replays the stored chunks, sampled requests are never served from
//! the cache unless configured, and /metrics counts hits.

use futures::StreamExt;
use serde_json::{json, Value};
use tidepool_gateway::answer_cache::CacheConfig;
use tidepool_gateway::gateway::GatewayConfig;
use tidepool_tests::{start_server, tiny_fixture, ServerOptions, TestServer};

fn server(sampled: bool) -> TestServer {
    start_server(ServerOptions {
        model: Some(tiny_fixture()),
        gateway: GatewayConfig {
            cache: CacheConfig {
                enabled: true,
                sampled,
                ..CacheConfig::default()
            },
            ..GatewayConfig::default()
        },
        ..Default::default()
    })
}

async fn post(s: &TestServer, path: &str, body: &Value) -> (String, Value) {
    let r = reqwest::Client::new()
        .post(s.url(path))
        .json(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let cache = r.headers()["x-tidepool-cache"]
        .to_str()
        .unwrap()
        .to_string();
    (cache, r.json().await.unwrap())
}

fn chat(text: &str, extra: Value) -> Value {
    let mut v = json!({"messages": [{"role": "user", "content": text}], "max_tokens": 12});
    for (k, x) in extra.as_object().unwrap() {
        v[k] = x.clone();
    }
    v
}

/// The parts of a chat completion that must not differ between a generation and its replay.
fn essence(v: &Value) -> Value {
    json!({"choices": v["choices"], "prompt": v["usage"]["prompt_tokens"],
           "completion": v["usage"]["completion_tokens"], "model": v["model"]})
}

#[tokio::test]
async fn deterministic_repeats_hit_with_the_same_body_and_streams_replay() {
    let s = server(false);
    for extra in [
        json!({"temperature": 0}),
        json!({"temperature": 0.9, "seed": 5}),
    ] {
        let body = chat("Tell me about tides", extra);
        let (c1, v1) = post(&s, "/v1/chat/completions", &body).await;
        let (c2, v2) = post(&s, "/v1/chat/completions", &body).await;
        assert_eq!((c1.as_str(), c2.as_str()), ("miss", "hit"));
        assert_eq!(essence(&v1), essence(&v2));

        // The same request streamed: replayed from the cache, same text.
        let mut streamed = body.clone();
        streamed["stream"] = json!(true);
        let r = reqwest::Client::new()
            .post(s.url("/v1/chat/completions"))
            .json(&streamed)
            .send()
            .await
            .unwrap();
        assert_eq!(r.headers()["x-tidepool-cache"], "hit");
        let mut text = String::new();
        let mut raw = String::new();
        let mut bytes = r.bytes_stream();
        while let Some(b) = bytes.next().await {
            raw.push_str(std::str::from_utf8(&b.unwrap()).unwrap());
        }
        for line in raw.lines().filter_map(|l| l.strip_prefix("data: ")) {
            if line == "[DONE]" {
                continue;
            }
            let c: Value = serde_json::from_str(line).unwrap();
            text.push_str(c["choices"][0]["delta"]["content"].as_str().unwrap_or(""));
        }
        assert_eq!(
            text,
            v1["choices"][0]["message"]["content"].as_str().unwrap()
        );
    }
    // A different request is a miss.
    let (c, _) = post(
        &s,
        "/v1/chat/completions",
        &chat("Something else", json!({"temperature": 0})),
    )
    .await;
    assert_eq!(c, "miss");

    // Ollama: the second identical request is a hit with the same answer.
    let body = json!({"model": "tiny-q8_0", "prompt": "Hi", "stream": false,
                      "options": {"temperature": 0, "num_predict": 8}});
    let (c1, v1) = post(&s, "/api/generate", &body).await;
    let (c2, v2) = post(&s, "/api/generate", &body).await;
    assert_eq!((c1.as_str(), c2.as_str()), ("miss", "hit"));
    assert_eq!(v1["response"], v2["response"]);
    assert_eq!(v1["eval_count"], v2["eval_count"]);

    let metrics = reqwest::Client::new()
        .get(s.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    // Hits: 2 chat x (plain + stream) + 1 generate; misses: 2 chat + 1 other + 1 generate.
    assert!(
        metrics.contains("tidepool_answer_cache_lookups_total{result=\"hit\"} 5"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tidepool_answer_cache_lookups_total{result=\"miss\"} 4"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tidepool_answer_cache_hit_ratio 0.5555"),
        "{metrics}"
    );
    s.stop(30);
}

#[tokio::test]
async fn sampled_requests_are_not_served_from_cache_unless_configured() {
    let body = chat("Pick words", json!({"temperature": 1.0, "max_tokens": 16}));
    let s = server(false);
    let (c1, _) = post(&s, "/v1/chat/completions", &body).await;
    let (c2, _) = post(&s, "/v1/chat/completions", &body).await;
    assert_eq!((c1.as_str(), c2.as_str()), ("miss", "miss"));
    s.stop(30);

    let s = server(true);
    let (c1, v1) = post(&s, "/v1/chat/completions", &body).await;
    let (c2, v2) = post(&s, "/v1/chat/completions", &body).await;
    assert_eq!((c1.as_str(), c2.as_str()), ("miss", "hit"));
    assert_eq!(essence(&v1), essence(&v2));
    s.stop(30);
}
