//! The OpenAI-compatible API end to end: the real server, the real engine on the tiny fixture,
//! a real HTTP client. Every endpoint, streaming and not, and every error case.

use futures::StreamExt;
use serde_json::{json, Value};
use tidepool_tests::{
    get_json, post_json, shared_tiny_server, start_server, tiny_fixture, ServerOptions, TestServer,
};

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

async fn post(path: &str, body: Value) -> (u16, Value) {
    post_json(shared_tiny_server().url(path), &body).await
}

/// Reads an SSE response into its `data:` payloads.
async fn sse(resp: reqwest::Response) -> Vec<String> {
    assert_eq!(
        resp.headers()["content-type"].to_str().unwrap(),
        "text/event-stream"
    );
    let mut buf = String::new();
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        buf.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
    }
    buf.lines()
        .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
        .map(|s| s.trim().to_string())
        .collect()
}

fn assert_openai_error(body: &Value, param: Option<&str>) {
    let e = &body["error"];
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(e["type"].is_string(), "{body}");
    assert!(
        e.get("param").is_some() && e.get("code").is_some(),
        "{body}"
    );
    if let Some(p) = param {
        assert_eq!(e["param"], p, "{body}");
    }
}

/// Starts a greedy streaming generation long enough (3000 tokens) to hold its slot for the rest of
/// a test.
async fn long_stream(s: &TestServer) -> reqwest::Response {
    client()
        .post(s.url("/v1/chat/completions"))
        .json(&json!({"messages": user("long"), "max_tokens": 3000, "stream": true, "temperature": 0}))
        .send()
        .await
        .unwrap()
}

fn user(text: &str) -> Value {
    json!([{"role": "user", "content": text}])
}

#[tokio::test]
async fn health_reports_ready_model() {
    let s = shared_tiny_server();
    let r = client().get(s.url("/health")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["status"], "ok");
    assert_eq!(v["model"], "tiny-q8_0");
}

#[tokio::test]
async fn models_list_and_get() {
    let s = shared_tiny_server();
    let v: Value = get_json(s.url("/v1/models")).await.1;
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["id"], "tiny-q8_0");
    assert_eq!(v["data"][0]["object"], "model");
    let r = client()
        .get(s.url("/v1/models/tiny-q8_0"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = client()
        .get(s.url("/v1/models/gpt-4"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_openai_error(&r.json().await.unwrap(), Some("model"));
}

#[tokio::test]
async fn chat_completion_non_streaming_has_consistent_usage() {
    let (status, v) = post(
        "/v1/chat/completions",
        json!({"model": "tiny-q8_0", "messages": user("Hello there"), "max_tokens": 12, "temperature": 0}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    let choice = &v["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    assert!(choice["message"]["content"].is_string());
    let finish = choice["finish_reason"].as_str().unwrap();
    assert!(finish == "stop" || finish == "length", "{finish}");
    let u = &v["usage"];
    let (p, c, t) = (
        u["prompt_tokens"].as_u64().unwrap(),
        u["completion_tokens"].as_u64().unwrap(),
        u["total_tokens"].as_u64().unwrap(),
    );
    assert!(p > 5, "the chat template alone is more than 5 tokens: {u}");
    assert!((1..=12).contains(&c), "{u}");
    assert_eq!(t, p + c);
    if finish == "length" {
        assert_eq!(c, 12);
    }
}

#[tokio::test]
async fn max_completion_tokens_bounds_the_output() {
    let (status, v) = post(
        "/v1/chat/completions",
        json!({"messages": user("Count"), "max_completion_tokens": 3, "temperature": 0}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() <= 3);
}

#[tokio::test]
async fn chat_completion_streaming_chunks_in_order() {
    let s = shared_tiny_server();
    let r = client()
        .post(s.url("/v1/chat/completions"))
        .json(&json!({
            "messages": user("Tell me about the sea"), "max_tokens": 10, "stream": true,
            "stream_options": {"include_usage": true}, "temperature": 0
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let data = sse(r).await;
    assert_eq!(data.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    // The finish reason is on the last choice-carrying chunk; the usage chunk follows it.
    let usage_chunk = chunks.last().unwrap();
    assert_eq!(usage_chunk["choices"], json!([]));
    let finished = &chunks[chunks.len() - 2];
    assert!(finished["choices"][0]["finish_reason"].is_string());
    for c in &chunks[..chunks.len() - 2] {
        assert!(c["choices"][0]["finish_reason"].is_null());
    }
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    let u = &usage_chunk["usage"];
    let completion = u["completion_tokens"].as_u64().unwrap();
    assert!((1..=10).contains(&completion), "{u}");
    assert_eq!(
        u["total_tokens"].as_u64().unwrap(),
        u["prompt_tokens"].as_u64().unwrap() + completion
    );
    assert!(!text.is_empty() || completion > 0);
}

#[tokio::test]
async fn streaming_without_include_usage_has_no_usage_chunk() {
    let s = shared_tiny_server();
    let r = client()
        .post(s.url("/v1/chat/completions"))
        .json(&json!({"messages": user("Hi"), "max_tokens": 4, "stream": true}))
        .send()
        .await
        .unwrap();
    let data = sse(r).await;
    assert_eq!(data.last().unwrap(), "[DONE]");
    for d in &data[..data.len() - 1] {
        let c: Value = serde_json::from_str(d).unwrap();
        assert!(c.get("usage").is_none(), "{c}");
        assert_eq!(c["choices"].as_array().unwrap().len(), 1);
    }
}

#[tokio::test]
async fn greedy_is_repeatable_and_stop_cuts_before_the_stop_string() {
    let body = json!({"messages": user("Say something"), "max_tokens": 24, "temperature": 0});
    let (_, a) = post("/v1/chat/completions", body.clone()).await;
    let (_, b) = post("/v1/chat/completions", body.clone()).await;
    let text = a["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        text,
        b["choices"][0]["message"]["content"].as_str().unwrap()
    );
    // Pick a stop string from the middle of the greedy output: the same greedy run must end
    // right before it.
    let chars: Vec<char> = text.chars().collect();
    if chars.len() < 6 {
        return; // the random model ended early; nothing to cut
    }
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect();
    if stop.trim().is_empty() {
        return;
    }
    let mut with_stop = body.clone();
    with_stop["stop"] = json!([stop.clone()]);
    let (status, c) = post("/v1/chat/completions", with_stop).await;
    assert_eq!(status, 200, "{c}");
    let cut = c["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(!cut.contains(&stop), "stop {stop:?} still in {cut:?}");
    assert!(
        text.starts_with(cut.trim_end()),
        "{cut:?} is not a prefix of {text:?}"
    );
    assert_eq!(c["choices"][0]["finish_reason"], "stop");
}

#[tokio::test]
async fn logit_bias_forces_a_token_and_bad_entries_are_400() {
    // +100 on one byte-level token makes greedy decoding pick it at every step, sampled or not.
    let ask = |max_tokens: u32, temperature: f32| {
        json!({"messages": user("Say something"), "max_tokens": max_tokens,
               "temperature": temperature, "seed": 5, "logit_bias": {"72": 100}})
    };
    let (status, one) = post("/v1/chat/completions", ask(1, 0.0)).await;
    assert_eq!(status, 200, "{one}");
    let piece = one["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(!piece.is_empty(), "{one}");
    for temperature in [0.0, 1.0] {
        let (_, three) = post("/v1/chat/completions", ask(3, temperature)).await;
        assert_eq!(
            three["choices"][0]["message"]["content"].as_str().unwrap(),
            piece.repeat(3),
            "{three}"
        );
    }
    for (bias, param_hint) in [
        (json!({"x": 1}), "token ids"),
        (json!({"1": 101}), "between -100 and 100"),
    ] {
        let (status, body) = post(
            "/v1/chat/completions",
            json!({"messages": user("hi"), "max_tokens": 2, "logit_bias": bias}),
        )
        .await;
        assert_eq!(status, 400, "{body}");
        assert_openai_error(&body, Some("logit_bias"));
        assert!(body["error"]["message"]
            .as_str()
            .unwrap()
            .contains(param_hint));
    }
    let (status, body) = post(
        "/v1/chat/completions",
        json!({"messages": user("hi"), "max_tokens": 2, "logit_bias": {"4000000": -100}}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("vocabulary"),
        "{body}"
    );
}

#[tokio::test]
async fn seed_makes_sampling_reproducible() {
    // Its own server: on a busy one, batching and prefix-cache hits perturb the float math enough
    // to move a draw across a boundary of the random fixture's nearly flat distribution.
    let s = start_server(ServerOptions {
        model: Some(tiny_fixture()),
        ..Default::default()
    });
    let req = |seed: u64| json!({"messages": user("Pick words"), "max_tokens": 16, "temperature": 1.0, "top_p": 0.95, "seed": seed});
    let send = |body: Value| {
        let url = s.url("/v1/chat/completions");
        async move {
            let r = client().post(url).json(&body).send().await.unwrap();
            assert_eq!(r.status(), 200);
            r.json::<Value>().await.unwrap()
        }
    };
    let a = send(req(7)).await;
    let b = send(req(7)).await;
    let c = send(req(8)).await;
    let text = |v: &Value| {
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(text(&a), text(&b));
    assert_ne!(text(&a), text(&c), "different seeds should differ");
}

#[tokio::test]
async fn presence_and_frequency_penalties_are_accepted() {
    let (status, v) = post(
        "/v1/chat/completions",
        json!({"messages": user("Hi"), "max_tokens": 4, "presence_penalty": 1.5, "frequency_penalty": 0.5}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
}

#[tokio::test]
async fn json_schema_response_format_is_enforced_by_grammar() {
    let schema = json!({
        "type": "object",
        "properties": {"label": {"type": "string", "enum": ["positive", "negative", "neutral"]}},
        "required": ["label"],
        "additionalProperties": false
    });
    for i in 0..3 {
        let (status, v) = post(
            "/v1/chat/completions",
            json!({
                "messages": user(&format!("Classify: sample {i}")), "max_tokens": 40, "temperature": 1.0,
                "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
            }),
        )
        .await;
        assert_eq!(status, 200, "{v}");
        let content = v["choices"][0]["message"]["content"].as_str().unwrap();
        let parsed: Value = serde_json::from_str(content.trim())
            .unwrap_or_else(|e| panic!("not JSON ({e}): {content:?}"));
        let label = parsed["label"].as_str().unwrap();
        assert!(
            ["positive", "negative", "neutral"].contains(&label),
            "{parsed}"
        );
    }
}

#[tokio::test]
async fn json_object_response_format_starts_an_object() {
    let (status, v) = post(
        "/v1/chat/completions",
        json!({"messages": user("Give JSON"), "max_tokens": 30, "temperature": 0,
               "response_format": {"type": "json_object"}}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let content = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .trim();
    assert!(content.starts_with('{'), "{content:?}");
    if v["choices"][0]["finish_reason"] == "stop" {
        let parsed: Value = serde_json::from_str(content).unwrap();
        assert!(parsed.is_object());
    }
}

#[tokio::test]
async fn tools_are_accepted_and_rendered() {
    let (status, v) = post(
        "/v1/chat/completions",
        json!({
            "messages": [
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp_c\": 21}"}
            ],
            "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Weather by city",
                       "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}],
            "tool_choice": "auto", "max_tokens": 8
        }),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    // The tools section of the template makes the prompt much longer than the bare messages.
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 60, "{v}");
}

#[tokio::test]
async fn text_completions_single_list_and_stream() {
    let (status, v) = post(
        "/v1/completions",
        json!({"model": "tiny-q8_0", "prompt": "Once upon a time", "max_tokens": 6, "temperature": 0}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "text_completion");
    assert!(v["choices"][0]["text"].is_string());
    let u = &v["usage"];
    assert!(u["prompt_tokens"].as_u64().unwrap() >= 3, "{u}");
    assert!(
        (1..=6).contains(&u["completion_tokens"].as_u64().unwrap()),
        "{u}"
    );

    let (status, v) = post(
        "/v1/completions",
        json!({"prompt": ["The sea", "The sky"], "max_tokens": 4}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let idx: Vec<u64> = v["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["index"].as_u64().unwrap())
        .collect();
    assert_eq!(idx, vec![0, 1]);

    let s = shared_tiny_server();
    let r = client()
        .post(s.url("/v1/completions"))
        .json(&json!({"prompt": "Hello", "max_tokens": 5, "stream": true,
                      "stream_options": {"include_usage": true}}))
        .send()
        .await
        .unwrap();
    let data = sse(r).await;
    assert_eq!(data.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert!(chunks.iter().all(|c| c["object"] == "text_completion"));
    assert!(chunks
        .iter()
        .any(|c| c["choices"][0]["finish_reason"].is_string()));
    assert!(
        chunks.last().unwrap()["usage"]["completion_tokens"]
            .as_u64()
            .unwrap()
            >= 1
    );
}

#[tokio::test]
async fn malformed_json_is_400() {
    let s = shared_tiny_server();
    let r = client()
        .post(s.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body("{\"messages\": [")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_openai_error(&r.json().await.unwrap(), None);
    let r = client()
        .post(s.url("/v1/chat/completions"))
        .body("")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
}

#[tokio::test]
async fn bad_parameters_are_400_naming_them() {
    let cases = [
        (
            json!({"messages": user("x"), "temperature": 5}),
            "temperature",
        ),
        (
            json!({"messages": user("x"), "max_tokens": 0}),
            "max_tokens",
        ),
        (json!({"messages": user("x"), "top_p": 1.5}), "top_p"),
        (
            json!({"messages": user("x"), "temperature": "hot"}),
            "temperature",
        ),
        (json!({"messages": user("x"), "n": 3}), "n"),
        (json!({"messages": []}), "messages"),
        (json!({"model": "tiny-q8_0"}), "messages"),
        (
            json!({"messages": [{"role": "wizard", "content": "x"}]}),
            "messages[0].role",
        ),
        (json!({"messages": user("x"), "stop": ["a", ""]}), "stop"),
    ];
    for (body, param) in cases {
        let (status, v) = post("/v1/chat/completions", body.clone()).await;
        assert_eq!(status, 400, "{body} -> {v}");
        assert_openai_error(&v, Some(param));
    }
    let (status, v) = post("/v1/completions", json!({"prompt": "x", "echo": true})).await;
    assert_eq!(status, 400);
    assert_openai_error(&v, Some("echo"));
}

#[tokio::test]
async fn invalid_grammar_is_400_not_500() {
    let (status, v) = post(
        "/v1/chat/completions",
        json!({"messages": user("x"), "max_tokens": 4,
               "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "no-such-type"}}}}),
    )
    .await;
    assert_eq!(status, 400, "{v}");
    assert_openai_error(&v, None);
}

#[tokio::test]
async fn unknown_model_is_404() {
    let (status, v) = post(
        "/v1/chat/completions",
        json!({"model": "gpt-9", "messages": user("x")}),
    )
    .await;
    assert_eq!(status, 404);
    assert_openai_error(&v, Some("model"));
    assert_eq!(v["error"]["code"], "model_not_found");
}

#[tokio::test]
async fn oversized_body_is_413() {
    let s = shared_tiny_server();
    let huge = "x".repeat(5 * 1024 * 1024);
    let r = client()
        .post(s.url("/v1/chat/completions"))
        .json(&json!({"messages": user(&huge)}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert_openai_error(&r.json().await.unwrap(), None);
}

#[tokio::test]
async fn unknown_route_is_404_and_wrong_method_405() {
    let s = shared_tiny_server();
    let r = client().get(s.url("/v1/nothing")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_openai_error(&r.json().await.unwrap(), None);
    let r = client()
        .get(s.url("/v1/chat/completions"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    assert_openai_error(&r.json().await.unwrap(), None);
}

#[tokio::test]
async fn not_ready_is_503_with_reason() {
    let s = start_server(ServerOptions::default());
    let r = client().get(s.url("/health")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["status"], "loading");
    assert!(v["reason"].as_str().unwrap().contains("loading"));
    let r = client()
        .post(s.url("/v1/chat/completions"))
        .json(&json!({"messages": user("x")}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    assert_openai_error(&r.json().await.unwrap(), None);
    s.stop(10);
}

#[tokio::test]
async fn graceful_shutdown_finishes_running_requests_and_refuses_new_ones() {
    let s = start_server(ServerOptions {
        model: Some(tiny_fixture()),
        ..Default::default()
    });
    // A long streaming request is running...
    let resp = long_stream(&s).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(s.service.in_flight(), 1);
    // ...when shutdown begins.
    s.begin_stop();
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let refused = client()
        .post(s.url("/v1/chat/completions"))
        .json(&json!({"messages": user("new"), "max_tokens": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 503);
    assert_openai_error(&refused.json().await.unwrap(), None);
    // The running one still completes, all the way to [DONE].
    let data = sse(resp).await;
    assert_eq!(data.last().unwrap(), "[DONE]");
    assert!(s.wait_stopped(std::time::Duration::from_secs(30)));
}

#[tokio::test]
async fn client_disconnect_cancels_the_generation_and_frees_its_slot() {
    let s = start_server(ServerOptions {
        model: Some(tiny_fixture()),
        slots: 1,
        ..Default::default()
    });
    let mut resp = long_stream(&s).await;
    assert_eq!(resp.status(), 200);
    assert!(resp.chunk().await.unwrap().is_some());
    assert_eq!(s.service.in_flight(), 1);
    drop(resp);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while s.service.in_flight() > 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(
        s.service.in_flight(),
        0,
        "the request should end when its client goes away"
    );
    // The only slot is free again for the next request.
    let r = client()
        .post(s.url("/v1/chat/completions"))
        .json(&json!({"messages": user("next"), "max_tokens": 4}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    s.stop(30);
}

#[tokio::test]
async fn a_full_pool_queues_then_refuses_with_429_and_deadlines_expire_cleanly() {
    let s = start_server(ServerOptions {
        model: Some(tiny_fixture()),
        slots: 1,
        pool: Some((1, std::time::Duration::from_millis(400))),
        ..Default::default()
    });
    // The only slot is taken by a long generation...
    let mut holder = long_stream(&s).await;
    assert_eq!(holder.status(), 200);
    assert!(holder.chunk().await.unwrap().is_some());
    // ...one request waits in the one-place queue...
    let waiting = tokio::spawn(
        client()
            .post(s.url("/v1/chat/completions"))
            .json(&json!({"messages": user("wait"), "max_tokens": 2}))
            .send(),
    );
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    // ...and the next is refused at once with 429 and Retry-After.
    let r = client()
        .post(s.url("/v1/chat/completions"))
        .json(&json!({"messages": user("refused"), "max_tokens": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    let v: Value = r.json().await.unwrap();
    assert_openai_error(&v, None);
    assert_eq!(v["error"]["code"], "queue_full");
    // The waiting one runs out its 400 ms deadline: an OpenAI error, not a hang.
    let r = waiting.await.unwrap().unwrap();
    assert_eq!(r.status(), 503);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "deadline_exceeded");
    drop(holder);
    s.stop(30);
}

#[tokio::test]
async fn required_over_three_tools_always_yields_a_call_that_validates() {
    if tidepool_tests::test_engine() == tidepool_engine::choice::EngineKind::MistralRs {
        // mistral.rs 0.8.1 fails a forced call on its first token (llguidance's check and its
        // consume disagree on the `<tool_call>` token): docs/api.md, "Known gaps".
        println!("skipped on mistral.rs: forced tool calls are a known gap of that engine");
        return;
    }
    let tools = tidepool_tests::three_tools();
    let offered: Vec<Value> = tools
        .iter()
        .map(|(name, params)| json!({"type": "function", "function": {"name": name, "parameters": params}}))
        .collect();
    let mut names_seen = std::collections::BTreeSet::new();
    for seed in 0..50 {
        let (status, v) = post(
            "/v1/chat/completions",
            json!({"messages": user("Do something useful."), "tools": offered,
                   "tool_choice": "required", "temperature": 1.0, "seed": seed, "max_tokens": 200}),
        )
        .await;
        assert_eq!(status, 200, "{v}");
        let choice = &v["choices"][0];
        assert_eq!(choice["finish_reason"], "tool_calls", "seed {seed}: {v}");
        let calls = choice["message"]["tool_calls"]
            .as_array()
            .expect("tool_calls");
        assert_eq!(calls.len(), 1, "{v}");
        let name = calls[0]["function"]["name"].as_str().unwrap();
        let schema = &tools
            .iter()
            .find(|(n, _)| *n == name)
            .unwrap_or_else(|| panic!("seed {seed}: `{name}` was not offered"))
            .1;
        let args: Value = serde_json::from_str(calls[0]["function"]["arguments"].as_str().unwrap())
            .unwrap_or_else(|e| panic!("seed {seed}: arguments do not parse: {e}: {v}"));
        tidepool_tests::check_schema(schema, &args)
            .unwrap_or_else(|e| panic!("seed {seed}: {e}: {v}"));
        names_seen.insert(name.to_string());
    }
    println!("tools called over 50 seeds: {names_seen:?}");
}
