//! The Anthropic Messages API end to end: the real server on the tiny fixture, a real HTTP
//! client. Messages streaming and not, the event sequence, stop sequences, tools (forced and as
//! a tool_result turn), count_tokens, and Anthropic-shaped errors.

use futures::StreamExt;
use serde_json::{json, Value};
use tidepool_engine::choice::EngineKind;
use tidepool_tests::{post_json, shared_tiny_server, test_engine};

const MODEL: &str = "tiny-q8_0";

async fn post(path: &str, body: Value) -> (u16, Value) {
    post_json(shared_tiny_server().url(path), &body).await
}

fn ask(text: &str, max_tokens: u32) -> Value {
    json!({"model": MODEL, "max_tokens": max_tokens, "temperature": 0,
           "messages": [{"role": "user", "content": text}]})
}

fn assert_anthropic_error(status: u16, v: &Value, want_status: u16, kind: &str) {
    assert_eq!(status, want_status, "{v}");
    assert_eq!(v["type"], "error", "{v}");
    assert_eq!(v["error"]["type"], kind, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{v}"
    );
}

/// The (event name, data) pairs of an SSE response.
async fn events(body: Value) -> Vec<(String, Value)> {
    let resp = reqwest::Client::new()
        .post(shared_tiny_server().url("/v1/messages"))
        .header("anthropic-version", "2023-06-01")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-type"].to_str().unwrap(),
        "text/event-stream"
    );
    let mut buf = String::new();
    let mut s = resp.bytes_stream();
    while let Some(c) = s.next().await {
        buf.push_str(std::str::from_utf8(&c.unwrap()).unwrap());
    }
    let mut out = Vec::new();
    for frame in buf.split("\n\n").filter(|f| !f.trim().is_empty()) {
        let mut name = None;
        let mut data = String::new();
        for line in frame.lines() {
            if let Some(n) = line.strip_prefix("event:") {
                name = Some(n.trim().to_string());
            } else if let Some(d) = line.strip_prefix("data:") {
                data.push_str(d.trim_start());
            }
        }
        let data: Value = serde_json::from_str(&data).unwrap_or_else(|e| panic!("{data}: {e}"));
        let name = name.expect("every event is named");
        assert_eq!(
            data["type"],
            name.as_str(),
            "the event name is the data's type"
        );
        out.push((name, data));
    }
    out
}

#[tokio::test]
async fn a_message_has_content_stop_reason_and_usage() {
    let (status, v) = post("/v1/messages", ask("Say hello", 12)).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["type"], "message");
    assert_eq!(v["role"], "assistant");
    assert_eq!(v["model"], MODEL);
    assert!(v["id"].as_str().unwrap().starts_with("msg_"), "{v}");
    assert_eq!(v["content"][0]["type"], "text");
    assert!(
        ["end_turn", "max_tokens"].contains(&v["stop_reason"].as_str().unwrap()),
        "{v}"
    );
    assert!(v["usage"]["input_tokens"].as_u64().unwrap() > 5, "{v}");
    let out = v["usage"]["output_tokens"].as_u64().unwrap();
    assert!((1..=12).contains(&out), "{v}");
    if v["stop_reason"] == "max_tokens" {
        assert_eq!(out, 12);
    }
}

#[tokio::test]
async fn the_stream_is_anthropics_event_sequence_and_matches_the_message() {
    let plain = post("/v1/messages", ask("Tell me a story", 16)).await.1;
    let mut body = ask("Tell me a story", 16);
    body["stream"] = json!(true);
    let evs = events(body).await;
    let names: Vec<&str> = evs.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names[..2], ["message_start", "ping"], "{names:?}");
    assert_eq!(names[names.len() - 2..], ["message_delta", "message_stop"]);
    assert_eq!(names[2], "content_block_start");
    assert_eq!(names[names.len() - 3], "content_block_stop");
    assert!(
        names[3..names.len() - 3]
            .iter()
            .all(|n| *n == "content_block_delta"),
        "{names:?}"
    );
    let start = &evs[0].1["message"];
    assert_eq!(start["role"], "assistant");
    assert!(start["content"].as_array().unwrap().is_empty());
    assert!(start["usage"]["input_tokens"].as_u64().unwrap() > 5);
    let text: String = evs
        .iter()
        .filter(|(n, _)| n == "content_block_delta")
        .map(|(_, d)| d["delta"]["text"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(text, plain["content"][0]["text"].as_str().unwrap());
    let delta = &evs[evs.len() - 2].1;
    assert_eq!(delta["delta"]["stop_reason"], plain["stop_reason"]);
    assert_eq!(
        delta["usage"]["output_tokens"],
        plain["usage"]["output_tokens"]
    );
}

#[tokio::test]
async fn a_stop_sequence_ends_the_message_and_is_reported() {
    let (_, v) = post("/v1/messages", ask("Say something", 24)).await;
    let text = v["content"][0]["text"].as_str().unwrap().to_string();
    let chars: Vec<char> = text.chars().collect();
    if chars.len() < 6 {
        return; // the random model ended early: nothing to cut
    }
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect();
    if stop.trim().is_empty() || text.find(&stop) == Some(0) {
        return;
    }
    for stream in [false, true] {
        let mut body = ask("Say something", 24);
        body["stop_sequences"] = json!(["\u{2603}never", stop.clone()]);
        let (cut, reason, sequence) = if stream {
            body["stream"] = json!(true);
            let evs = events(body).await;
            let text: String = evs
                .iter()
                .filter(|(n, _)| n == "content_block_delta")
                .map(|(_, d)| d["delta"]["text"].as_str().unwrap().to_string())
                .collect();
            let d = evs[evs.len() - 2].1["delta"].clone();
            (text, d["stop_reason"].clone(), d["stop_sequence"].clone())
        } else {
            let (status, v) = post("/v1/messages", body).await;
            assert_eq!(status, 200, "{v}");
            (
                v["content"][0]["text"].as_str().unwrap().to_string(),
                v["stop_reason"].clone(),
                v["stop_sequence"].clone(),
            )
        };
        assert!(!cut.contains(&stop), "stop {stop:?} still in {cut:?}");
        assert!(
            text.starts_with(&cut),
            "{cut:?} is not a prefix of {text:?}"
        );
        assert_eq!(reason, "stop_sequence", "stream {stream}");
        assert_eq!(sequence, stop.as_str(), "stream {stream}");
    }
}

#[tokio::test]
async fn a_forced_tool_is_a_tool_use_block_whose_input_validates() {
    if test_engine() == EngineKind::MistralRs {
        // mistral.rs 0.8.1 fails a forced call on its first token: docs/api.md, "Known gaps".
        println!("skipped on mistral.rs: forced tool calls are a known gap of that engine");
        return;
    }
    let tools: Vec<Value> = tidepool_tests::three_tools()
        .into_iter()
        .map(
            |(name, schema)| json!({"name": name, "description": "a tool", "input_schema": schema}),
        )
        .collect();
    for (choice, stream) in [
        (json!({"type": "tool", "name": "add"}), false),
        (json!({"type": "any"}), false),
        (json!({"type": "any"}), true),
    ] {
        let mut body = ask("Use a tool.", 200);
        body["tools"] = json!(tools);
        body["tool_choice"] = choice.clone();
        let blocks: Vec<Value> = if stream {
            body["stream"] = json!(true);
            let evs = events(body).await;
            assert_eq!(evs[evs.len() - 2].1["delta"]["stop_reason"], "tool_use");
            let mut blocks = Vec::new();
            for (name, d) in &evs {
                match name.as_str() {
                    "content_block_start" => blocks.push(d["content_block"].clone()),
                    "content_block_delta" if d["delta"]["type"] == "input_json_delta" => {
                        let b = blocks.last_mut().unwrap();
                        b["input"] =
                            serde_json::from_str(d["delta"]["partial_json"].as_str().unwrap())
                                .unwrap();
                    }
                    _ => {}
                }
            }
            blocks
        } else {
            let (status, v) = post("/v1/messages", body).await;
            assert_eq!(status, 200, "{v}");
            assert_eq!(v["stop_reason"], "tool_use", "{v}");
            v["content"].as_array().unwrap().clone()
        };
        let uses: Vec<&Value> = blocks.iter().filter(|b| b["type"] == "tool_use").collect();
        assert_eq!(uses.len(), 1, "{choice}: {blocks:?}");
        let name = uses[0]["name"].as_str().unwrap();
        if choice["type"] == "tool" {
            assert_eq!(name, "add");
        }
        let schema = tidepool_tests::three_tools()
            .into_iter()
            .find(|(n, _)| *n == name)
            .unwrap()
            .1;
        tidepool_tests::check_schema(&schema, &uses[0]["input"]).unwrap();
        assert!(uses[0]["id"].as_str().is_some_and(|id| !id.is_empty()));
    }
}

#[tokio::test]
async fn a_tool_result_turn_is_answered() {
    let (status, v) = post(
        "/v1/messages",
        json!({"model": MODEL, "max_tokens": 8, "system": "You use tools.",
               "tools": [{"name": "get_weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}],
               "messages": [
                   {"role": "user", "content": "Weather in Paris?"},
                   {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {"city": "Paris"}}]},
                   {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01", "content": "21 C and sunny"}]}]}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    // The tools, the call and its result are all in the prompt.
    let (_, bare) = post(
        "/v1/messages/count_tokens",
        json!({"model": MODEL,
        "messages": [{"role": "user", "content": "Weather in Paris?"}]}),
    )
    .await;
    assert!(
        v["usage"]["input_tokens"].as_u64().unwrap() > bare["input_tokens"].as_u64().unwrap() + 20,
        "{v} vs {bare}"
    );
}

#[tokio::test]
async fn count_tokens_counts_what_a_message_would_read() {
    let body = json!({"model": MODEL, "system": "Be brief.",
                      "messages": [{"role": "user", "content": "How many tokens is this?"}]});
    let (status, c) = post("/v1/messages/count_tokens", body.clone()).await;
    assert_eq!(status, 200, "{c}");
    let mut run = body.clone();
    run["max_tokens"] = json!(1);
    let (_, m) = post("/v1/messages", run).await;
    assert_eq!(c["input_tokens"], m["usage"]["input_tokens"], "{c} {m}");
}

#[tokio::test]
async fn errors_are_anthropic_shaped() {
    let (s, v) = post(
        "/v1/messages",
        json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}]}),
    )
    .await;
    assert_anthropic_error(s, &v, 400, "invalid_request_error");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_tokens"),
        "{v}"
    );
    let (s, v) = post("/v1/messages", {
        let mut b = ask("x", 8);
        b["temperature"] = json!(3);
        b
    })
    .await;
    assert_anthropic_error(s, &v, 400, "invalid_request_error");
    let (s, v) = post("/v1/messages", {
        let mut b = ask("x", 8);
        b["model"] = json!("claude-sonnet-4-5");
        b
    })
    .await;
    assert_anthropic_error(s, &v, 404, "not_found_error");
    let (s, v) = post("/v1/messages", json!({"max_tokens": 8, "messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}]}]})).await;
    assert_anthropic_error(s, &v, 400, "invalid_request_error");
    let r = reqwest::Client::new()
        .post(shared_tiny_server().url("/v1/messages"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    let s = r.status().as_u16();
    let v: Value = r.json().await.unwrap();
    assert_anthropic_error(s, &v, 400, "invalid_request_error");
    // Counting is held to the same bounds as answering, before anything is tokenized.
    let many: Vec<Value> = (0..5000)
        .map(|_| json!({"role": "user", "content": "x"}))
        .collect();
    let (s, v) = post(
        "/v1/messages/count_tokens",
        json!({"model": MODEL, "messages": many}),
    )
    .await;
    assert_anthropic_error(s, &v, 400, "invalid_request_error");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("5000 messages"),
        "{v}"
    );
    let (s, v) = post("/v1/messages/nope", json!({})).await;
    assert_anthropic_error(s, &v, 404, "not_found_error");
    let r = reqwest::Client::new()
        .get(shared_tiny_server().url("/v1/messages"))
        .send()
        .await
        .unwrap();
    let s = r.status().as_u16();
    let v: Value = r.json().await.unwrap();
    assert_anthropic_error(s, &v, 405, "invalid_request_error");
}
