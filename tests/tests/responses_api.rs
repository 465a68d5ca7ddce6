//! OpenAI's Responses API end to end: the real server on the tiny fixture, a real HTTP client.
//! A response streaming and not, the typed event sequence, a function-call round trip,
//! input_tokens, and the stateless refusals.

use futures::StreamExt;
use serde_json::{json, Value};
use tidepool_engine::choice::EngineKind;
use tidepool_tests::{post_json, shared_tiny_server, test_engine};

async fn post(path: &str, body: Value) -> (u16, Value) {
    post_json(shared_tiny_server().url(path), &body).await
}

async fn events(body: Value) -> Vec<Value> {
    let resp = reqwest::Client::new()
        .post(shared_tiny_server().url("/v1/responses"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut buf = String::new();
    let mut s = resp.bytes_stream();
    while let Some(c) = s.next().await {
        buf.push_str(std::str::from_utf8(&c.unwrap()).unwrap());
    }
    buf.split("\n\n")
        .filter(|f| !f.trim().is_empty())
        .map(|frame| {
            let name = frame
                .lines()
                .find_map(|l| l.strip_prefix("event:"))
                .unwrap()
                .trim();
            let data: Value = serde_json::from_str(
                frame
                    .lines()
                    .find_map(|l| l.strip_prefix("data:"))
                    .unwrap()
                    .trim(),
            )
            .unwrap();
            assert_eq!(data["type"], name);
            data
        })
        .collect()
}

fn output_text(r: &Value) -> String {
    r["output"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["type"] == "message")
        .flat_map(|i| i["content"].as_array().unwrap().iter())
        .map(|c| c["text"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn a_response_and_its_stream_agree() {
    let body = json!({"input": "Tell me a story", "instructions": "Be brief.", "max_output_tokens": 16, "temperature": 0});
    let (status, r) = post("/v1/responses", body.clone()).await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["object"], "response");
    assert!(r["id"].as_str().unwrap().starts_with("resp_"));
    assert!(
        ["completed", "incomplete"].contains(&r["status"].as_str().unwrap()),
        "{r}"
    );
    if r["status"] == "incomplete" {
        assert_eq!(r["incomplete_details"]["reason"], "max_output_tokens");
    }
    assert_eq!(r["store"], false);
    let u = &r["usage"];
    assert_eq!(
        u["total_tokens"].as_u64().unwrap(),
        u["input_tokens"].as_u64().unwrap() + u["output_tokens"].as_u64().unwrap()
    );
    let mut stream_body = body.clone();
    stream_body["stream"] = json!(true);
    let evs = events(stream_body).await;
    for (i, e) in evs.iter().enumerate() {
        assert_eq!(e["sequence_number"], i as u64, "{e}");
    }
    let kinds: Vec<&str> = evs.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(kinds[..2], ["response.created", "response.in_progress"]);
    assert_eq!(kinds[2], "response.output_item.added");
    let last = evs.last().unwrap();
    assert!(
        ["response.completed", "response.incomplete"].contains(&kinds[kinds.len() - 1]),
        "{kinds:?}"
    );
    let deltas: String = evs
        .iter()
        .filter(|e| e["type"] == "response.output_text.delta")
        .map(|e| e["delta"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(deltas, output_text(&r));
    assert_eq!(output_text(&last["response"]), deltas);
    assert_eq!(
        last["response"]["usage"]["output_tokens"],
        r["usage"]["output_tokens"]
    );
}

#[tokio::test]
async fn a_function_call_round_trip() {
    let tools: Vec<Value> = tidepool_tests::three_tools()
        .into_iter()
        .map(|(name, p)| json!({"type": "function", "name": name, "parameters": p}))
        .collect();
    let call = if test_engine() == EngineKind::LlamaCpp {
        let (status, r) = post(
            "/v1/responses",
            json!({"input": "Use a tool.", "tools": tools, "tool_choice": "required", "max_output_tokens": 200}),
        )
        .await;
        assert_eq!(status, 200, "{r}");
        let calls: Vec<&Value> = r["output"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|i| i["type"] == "function_call")
            .collect();
        assert_eq!(calls.len(), 1, "{r}");
        let name = calls[0]["name"].as_str().unwrap();
        let schema = tidepool_tests::three_tools()
            .into_iter()
            .find(|(n, _)| *n == name)
            .unwrap()
            .1;
        let args: Value = serde_json::from_str(calls[0]["arguments"].as_str().unwrap()).unwrap();
        tidepool_tests::check_schema(&schema, &args).unwrap();
        calls[0].clone()
    } else {
        // Forced calls are a known gap of mistral.rs (docs/api.md): the round trip still works.
        json!({"type": "function_call", "call_id": "call_1", "name": "add", "arguments": "{\"a\": 1, \"b\": 2}"})
    };
    let call_id = call["call_id"].as_str().unwrap().to_string();
    let (status, r) = post(
        "/v1/responses",
        json!({"tools": tools, "max_output_tokens": 8, "input": [
            {"role": "user", "content": "Use a tool."},
            call,
            {"type": "function_call_output", "call_id": call_id, "output": "3"}]}),
    )
    .await;
    assert_eq!(status, 200, "{r}");
    let (_, bare) = post(
        "/v1/responses/input_tokens",
        json!({"input": "Use a tool."}),
    )
    .await;
    assert_eq!(bare["object"], "response.input_tokens");
    assert!(
        r["usage"]["input_tokens"].as_u64().unwrap() > bare["input_tokens"].as_u64().unwrap() + 20,
        "{r} {bare}"
    );
}

#[tokio::test]
async fn input_tokens_counts_what_a_response_reads() {
    let body = json!({"input": [{"role": "user", "content": [{"type": "input_text", "text": "How long is this?"}]}],
                      "instructions": "Be brief."});
    let (status, c) = post("/v1/responses/input_tokens", body.clone()).await;
    assert_eq!(status, 200, "{c}");
    let mut run = body;
    run["max_output_tokens"] = json!(1);
    let (_, r) = post("/v1/responses", run).await;
    assert_eq!(c["input_tokens"], r["usage"]["input_tokens"]);
}

#[tokio::test]
async fn what_a_stateless_server_cannot_do_is_a_clear_400() {
    for (body, param) in [
        (
            json!({"input": "x", "previous_response_id": "resp_123"}),
            "previous_response_id",
        ),
        (
            json!({"input": "x", "tools": [{"type": "web_search_preview"}]}),
            "tools[0].type",
        ),
        (
            json!({"input": "x", "max_output_tokens": 0}),
            "max_output_tokens",
        ),
        (json!({"input": []}), "input"),
        (json!({"input": "x", "temperature": 5}), "temperature"),
    ] {
        let (status, v) = post("/v1/responses", body.clone()).await;
        assert_eq!(status, 400, "{body}: {v}");
        assert_eq!(v["error"]["param"], param, "{v}");
    }
    // Counting is held to the same bounds as answering, before anything is tokenized.
    let many: Vec<Value> = (0..5000)
        .map(|_| json!({"role": "user", "content": "x"}))
        .collect();
    let (status, v) = post("/v1/responses/input_tokens", json!({"input": many})).await;
    assert_eq!(status, 400, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("5000 messages"),
        "{v}"
    );
}
