//! The Ollama-compatible API end to end: the real server on the tiny fixture, a real HTTP client.
//! Generate and chat, streaming (NDJSON) and not, format constraints, the model endpoints,
//! keep_alive on a pool, and Ollama-shaped errors.

use futures::StreamExt;
use serde_json::{json, Value};
use tidepool_control::policy::{DownRules, PolicyConfig, UpRules};
use tidepool_tests::{
    get_json, post_json, shared_tiny_server, start_server, tiny_fixture, ServerOptions,
};

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

const MODEL: &str = "tiny-q8_0";

async fn post(path: &str, body: Value) -> (u16, Value) {
    post_json(shared_tiny_server().url(path), &body).await
}

/// Reads an NDJSON response into its objects.
async fn ndjson(resp: reqwest::Response) -> Vec<Value> {
    assert_eq!(
        resp.headers()["content-type"].to_str().unwrap(),
        "application/x-ndjson"
    );
    let mut buf = Vec::new();
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        buf.extend_from_slice(&chunk.unwrap());
    }
    std::str::from_utf8(&buf)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad line {l:?}: {e}")))
        .collect()
}

fn assert_ollama_error(v: &Value) {
    assert!(
        v["error"].as_str().is_some_and(|m| !m.is_empty()),
        "not an Ollama error: {v}"
    );
    assert_eq!(v.as_object().unwrap().len(), 1, "{v}");
}

#[tokio::test]
async fn generate_non_streaming_has_text_and_stats() {
    let (status, v) = post(
        "/api/generate",
        json!({"model": MODEL, "prompt": "Why is the sky blue?", "stream": false,
               "options": {"temperature": 0, "num_predict": 12}}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["model"], MODEL);
    assert_eq!(v["done"], true);
    assert!(["stop", "length"].contains(&v["done_reason"].as_str().unwrap()));
    assert!(v["response"].is_string());
    let eval = v["eval_count"].as_u64().unwrap();
    assert!((1..=12).contains(&eval), "{v}");
    assert!(v["prompt_eval_count"].as_u64().unwrap() > 3, "{v}");
    assert!(v["total_duration"].as_u64().unwrap() > 0);
    assert!(v["created_at"].as_str().unwrap().ends_with('Z'));
}

#[tokio::test]
async fn generate_streams_ndjson_by_default_and_matches_the_plain_answer() {
    let body = json!({"model": MODEL, "prompt": "Count to three.", "system": "Be brief.",
                      "options": {"temperature": 0, "num_predict": 10}});
    let s = shared_tiny_server();
    let resp = client()
        .post(s.url("/api/generate"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let lines = ndjson(resp).await;
    let (last, parts) = lines.split_last().unwrap();
    assert!(parts.iter().all(|p| p["done"] == false), "{lines:?}");
    assert_eq!(last["done"], true);
    assert!(last["eval_count"].as_u64().unwrap() >= 1);
    let streamed: String = lines
        .iter()
        .map(|l| l["response"].as_str().unwrap())
        .collect();
    let mut plain = body.clone();
    plain["stream"] = json!(false);
    let (_, v) = post("/api/generate", plain).await;
    assert_eq!(v["response"].as_str().unwrap(), streamed);
}

#[tokio::test]
async fn chat_streaming_and_not() {
    let messages = json!([{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": "Hello there"}]);
    let (status, v) = post(
        "/api/chat",
        json!({"model": MODEL, "messages": messages, "stream": false,
               "options": {"temperature": 0, "num_predict": 8}}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["message"]["role"], "assistant");
    let plain = v["message"]["content"].as_str().unwrap().to_string();
    assert_eq!(v["done"], true);

    let s = shared_tiny_server();
    let resp = client()
        .post(s.url("/api/chat"))
        .json(
            &json!({"model": format!("{MODEL}:latest"), "messages": messages,
                      "options": {"temperature": 0, "num_predict": 8}}),
        )
        .send()
        .await
        .unwrap();
    let lines = ndjson(resp).await;
    assert_eq!(lines.last().unwrap()["done"], true);
    let streamed: String = lines
        .iter()
        .map(|l| l["message"]["content"].as_str().unwrap())
        .collect();
    assert_eq!(streamed, plain);
}

#[tokio::test]
async fn format_json_schema_is_enforced() {
    let schema = json!({
        "type": "object",
        "properties": {"label": {"type": "string", "enum": ["positive", "negative"]}},
        "required": ["label"], "additionalProperties": false,
        // llguidance's option: compact JSON, so random weights cannot pad it with whitespace.
        "x-guidance": {"whitespace_flexible": false}
    });
    for i in 0..3 {
        let (status, v) = post(
            "/api/chat",
            json!({"model": MODEL, "stream": false, "format": schema,
                   "messages": [{"role": "user", "content": format!("Classify {i}")}],
                   "options": {"temperature": 1.0, "seed": i, "num_predict": 60}}),
        )
        .await;
        assert_eq!(status, 200, "{v}");
        let content = v["message"]["content"].as_str().unwrap();
        let parsed: Value =
            serde_json::from_str(content).unwrap_or_else(|e| panic!("not JSON ({e}): {content:?}"));
        assert!(["positive", "negative"].contains(&parsed["label"].as_str().unwrap()));
    }
    let (status, v) = post(
        "/api/generate",
        json!({"model": MODEL, "prompt": "JSON please", "stream": false, "format": "json",
               "options": {"temperature": 0, "num_predict": 20}}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert!(
        v["response"].as_str().unwrap().trim().starts_with('{'),
        "{v}"
    );
}

#[tokio::test]
async fn tags_ps_show_version() {
    let s = shared_tiny_server();
    let tags: Value = get_json(s.url("/api/tags")).await.1;
    let m = &tags["models"][0];
    assert_eq!(m["name"], MODEL);
    assert_eq!(m["digest"].as_str().unwrap().len(), 64);
    assert_eq!(m["details"]["family"], "qwen2");
    assert!(m["size"].as_u64().unwrap() > 0);

    let ps: Value = get_json(s.url("/api/ps")).await.1;
    assert_eq!(ps["models"].as_array().unwrap().len(), 1, "{ps}");
    assert!(ps["models"][0]["expires_at"].is_string());

    let (status, show) = post("/api/show", json!({"model": MODEL})).await;
    assert_eq!(status, 200, "{show}");
    assert_eq!(show["model_info"]["general.architecture"], "qwen2");
    assert_eq!(show["details"]["format"], "gguf");

    let v: Value = get_json(s.url("/api/version")).await.1;
    assert!(v["version"].as_str().unwrap().contains('.'));
}

#[tokio::test]
async fn errors_are_ollama_shaped() {
    let (status, v) = post(
        "/api/generate",
        json!({"model": "llama3:8b", "prompt": "x", "stream": false}),
    )
    .await;
    assert_eq!(status, 404);
    assert_ollama_error(&v);
    assert!(v["error"].as_str().unwrap().contains("llama3:8b"));

    let (status, v) = post("/api/chat", json!({"messages": []})).await;
    assert_eq!(status, 400);
    assert_ollama_error(&v);
    assert!(v["error"].as_str().unwrap().contains("model"));

    let (status, v) = post(
        "/api/chat",
        json!({"model": MODEL, "stream": false, "messages": [{"role": "user", "content": "x"}],
               "options": {"temperature": "hot"}}),
    )
    .await;
    assert_eq!(status, 400);
    assert_ollama_error(&v);
    assert!(v["error"].as_str().unwrap().contains("temperature"), "{v}");

    let (status, v) = post(
        "/api/generate",
        json!({"model": MODEL, "prompt": "x", "options": {"top_p": 7}}),
    )
    .await;
    assert_eq!(status, 400);
    assert!(v["error"].as_str().unwrap().contains("top_p"), "{v}");

    let (status, v) = post(
        "/api/chat",
        json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}],
               "format": {"type": "no-such-type"}}),
    )
    .await;
    assert_eq!(status, 400, "{v}");
    assert_ollama_error(&v);

    let (status, v) = post("/api/show", json!({"model": "nope"})).await;
    assert_eq!(status, 404);
    assert_ollama_error(&v);

    let s = shared_tiny_server();
    let r = client()
        .post(s.url("/api/generate"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_ollama_error(&r.json().await.unwrap());

    // Route-level errors under /api are Ollama-shaped too.
    let r = client().get(s.url("/api/pull")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_ollama_error(&r.json().await.unwrap());
    let r = client().get(s.url("/api/chat")).send().await.unwrap();
    assert_eq!(r.status(), 405);
    assert_ollama_error(&r.json().await.unwrap());

    let r = client()
        .post(s.url("/api/chat"))
        .header("x-tidepool-priority", "urgent")
        .json(&json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_ollama_error(&r.json().await.unwrap());
}

#[tokio::test]
async fn empty_prompt_only_loads() {
    let (status, v) = post("/api/generate", json!({"model": MODEL})).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["done"], true);
    assert_eq!(v["done_reason"], "load");
    assert_eq!(v["response"], "");
}

#[tokio::test]
async fn keep_alive_sets_the_models_expiry_never_the_policy_and_zero_unloads() {
    let s = start_server(ServerOptions {
        model: Some(tiny_fixture()),
        pool: Some((8, std::time::Duration::from_secs(30))),
        policy: Some(PolicyConfig {
            min_workers: 1,
            max_workers: 2,
            idle_ttl_s: 600.0,
            activation_rate: 0.1,
            up: UpRules {
                rate_per_worker: 100.0,
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
    let c = client();
    let generate =
        |keep_alive: Value| {
            c.post(s.url("/api/generate"))
            .json(&json!({"model": MODEL, "prompt": "hi", "stream": false, "keep_alive": keep_alive,
                          "options": {"num_predict": 3, "temperature": 0}}))
            .send()
        };
    let r = generate(json!("5m")).await.unwrap();
    assert_eq!(r.status(), 200);
    // The model's expiry, not the policy: /admin/config is what the user configured.
    let cfg: Value = get_json(s.url("/admin/config")).await.1;
    assert_eq!(cfg["policy"]["idle_ttl_s"], 600.0, "{cfg}");
    assert_eq!(cfg["policy"]["min_workers"], 1, "{cfg}");
    let status: Value = get_json(s.url("/admin/status")).await.1;
    assert_eq!(status["keep_alive"], 300.0, "{status}");
    let ps: Value = get_json(s.url("/api/ps")).await.1;
    let expires = ps["models"][0]["expires_at"].as_str().unwrap().to_string();
    assert!(
        expires.as_str() < "2100",
        "a 5 minute expiry, not forever: {expires}"
    );

    let r = generate(json!("soon")).await.unwrap();
    assert_eq!(r.status(), 400);
    assert_ollama_error(&r.json().await.unwrap());

    // keep_alive 0: the answer still comes, then the pool empties.
    let r = generate(json!(0)).await.unwrap();
    assert_eq!(r.status(), 200);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let ps: Value = get_json(s.url("/api/ps")).await.1;
        if ps["models"].as_array().unwrap().is_empty() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "still loaded: {ps}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let cfg: Value = get_json(s.url("/admin/config")).await.1;
    assert_eq!(
        cfg["policy"]["min_workers"], 1,
        "unloading rewrote the policy: {cfg}"
    );
    // The next request loads a worker again (cold start).
    let r = generate(json!("1m")).await.unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["done"], true);
    s.stop(30);
}
