//! Task profiles end to end on the tiny random-weight fixture: the sentiment profile's grammar
//! makes every answer a valid label whatever the weights, however the profile is chosen (body
//! field, header, model suffix, either API); the combined profile answers with the label, then
//! the reply; configured profiles work; misuse is a clear error.

use serde_json::{json, Value};
use tidepool_gateway::gateway::GatewayConfig;
use tidepool_gateway::profile::ProfileConfig;
use tidepool_tests::{start_server, tiny_fixture, ServerOptions, TestServer};

const LABELS: [&str; 3] = ["positive", "negative", "neutral"];

fn server() -> TestServer {
    let mut gateway = ServerOptions::default().gateway;
    gateway.profiles.insert(
        "yesno".into(),
        ProfileConfig {
            system: Some("Answer yes or no.".into()),
            labels: vec!["yes".into(), "no".into()],
            ..ProfileConfig::default()
        },
    );
    start_server(ServerOptions {
        model: Some(tiny_fixture()),
        gateway: GatewayConfig { ..gateway },
        ..Default::default()
    })
}

async fn send(s: &TestServer, path: &str, body: Value, header: Option<&str>) -> reqwest::Response {
    let mut r = reqwest::Client::new().post(s.url(path)).json(&body);
    if let Some(p) = header {
        r = r.header("x-tidepool-profile", p);
    }
    r.send().await.unwrap()
}

const INPUTS: [&str; 8] = [
    "I love this beach!",
    "The ferry was late again and I missed my meeting.",
    "It is Tuesday.",
    "Best holiday ever, the kids adored the rock pools",
    "This product broke after two days. Terrible.",
    "meh",
    "¿Dónde está la playa?",
    "",
];

#[tokio::test]
async fn sentiment_answers_are_always_a_valid_label() {
    let s = server();
    let mut n = 0;
    for (i, text) in INPUTS.iter().enumerate() {
        for seed in 0..4u64 {
            // Sampled at temperature 1.2 so the random weights pick freely: only the grammar keeps
            // the answer a label.
            let body = |extra: Value| {
                let mut b = json!({"messages": [{"role": "user", "content": text}],
                                   "temperature": 1.2, "seed": seed});
                for (k, v) in extra.as_object().unwrap() {
                    b[k] = v.clone();
                }
                b
            };
            let (r, how) = match (i + seed as usize) % 3 {
                0 => (
                    send(
                        &s,
                        "/v1/chat/completions",
                        body(json!({"profile": "sentiment"})),
                        None,
                    )
                    .await,
                    "field",
                ),
                1 => (
                    send(
                        &s,
                        "/v1/chat/completions",
                        body(json!({})),
                        Some("sentiment"),
                    )
                    .await,
                    "header",
                ),
                _ => (
                    send(
                        &s,
                        "/v1/chat/completions",
                        body(json!({"model": "tiny-q8_0:sentiment"})),
                        None,
                    )
                    .await,
                    "model suffix",
                ),
            };
            assert_eq!(r.status(), 200, "{how}");
            assert_eq!(r.headers()["x-tidepool-profile"], "sentiment", "{how}");
            let v: Value = r.json().await.unwrap();
            let content = v["choices"][0]["message"]["content"].as_str().unwrap();
            assert!(
                LABELS.contains(&content),
                "{how}: {content:?} is not a label"
            );
            assert!(
                v["usage"]["completion_tokens"].as_u64().unwrap() <= 10,
                "{v}"
            );
            n += 1;
        }
    }
    assert_eq!(n, 32);

    // The Ollama API, choosing the profile by model tag.
    for seed in 0..6 {
        let r = send(
            &s,
            "/api/chat",
            json!({"model": "tiny-q8_0:sentiment", "stream": false,
                   "messages": [{"role": "user", "content": format!("Review number {seed}")}],
                   "options": {"temperature": 1.5, "seed": seed}}),
            None,
        )
        .await;
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        let content = v["message"]["content"].as_str().unwrap();
        assert!(LABELS.contains(&content), "{content:?}");
    }

    // A configured profile with its own labels.
    for seed in 0..4 {
        let r = send(
            &s,
            "/api/generate",
            json!({"model": "tiny-q8_0:yesno", "stream": false, "prompt": "Is the tide in?",
                   "options": {"temperature": 1.5, "seed": seed}}),
            None,
        )
        .await;
        let v: Value = r.json().await.unwrap();
        assert!(
            ["yes", "no"].contains(&v["response"].as_str().unwrap()),
            "{v}"
        );
    }
    s.stop(30);
}

#[tokio::test]
async fn the_combined_profile_returns_the_label_then_the_reply() {
    let s = server();
    let body = json!({"profile": "sentiment+chat", "max_tokens": 12, "temperature": 0,
                      "messages": [{"role": "user", "content": "My sandcastle survived the tide!"}]});
    let r = send(&s, "/v1/chat/completions", body.clone(), None).await;
    assert_eq!(r.status(), 200);
    let label = r.headers()["x-tidepool-label"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(LABELS.contains(&label.as_str()), "{label}");
    let v: Value = r.json().await.unwrap();
    let content = v["choices"][0]["message"]["content"].as_str().unwrap();
    let (first, reply) = content
        .split_once("\n\n")
        .expect("label, blank line, reply");
    assert_eq!(first, label);
    let parts = &v["usage"]["tidepool_label"];
    assert_eq!(parts["label"], label.as_str());
    let label_completion = parts["label_completion_tokens"].as_u64().unwrap();
    let completion = v["usage"]["completion_tokens"].as_u64().unwrap();
    // The reply generated its own tokens after the label's.
    assert!(completion > label_completion, "{v}");
    assert!(completion - label_completion <= 12, "{v}");
    // Both prompts are counted: the label's is the conversation plus its question.
    let label_prompt = parts["label_prompt_tokens"].as_u64().unwrap();
    let prompt = v["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(
        prompt > label_prompt && label_prompt > prompt - label_prompt,
        "{v}"
    );

    // Streaming: the same answer, label first.
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let r = send(&s, "/v1/chat/completions", streamed, None).await;
    assert_eq!(r.headers()["x-tidepool-label"], label.as_str());
    let text: String = r
        .text()
        .await
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|l| *l != "[DONE]")
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .unwrap_or("")
                .to_string()
        })
        .collect();
    assert_eq!(text, content);
    assert!(reply.len() <= content.len());

    // Ollama, by model tag.
    let r = send(
        &s,
        "/api/chat",
        json!({"model": "tiny-q8_0:sentiment+chat", "stream": false,
               "messages": [{"role": "user", "content": "My sandcastle survived the tide!"}],
               "options": {"temperature": 0, "num_predict": 12}}),
        None,
    )
    .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["message"]["content"].as_str().unwrap(), content);
    assert_eq!(v["tidepool_label"]["label"], label.as_str());
    s.stop(30);
}

#[tokio::test]
async fn profile_misuse_is_a_clear_error() {
    let s = server();
    let msgs = json!([{"role": "user", "content": "x"}]);
    let r = send(
        &s,
        "/v1/chat/completions",
        json!({"messages": msgs, "profile": "poetry"}),
        None,
    )
    .await;
    assert_eq!(r.status(), 404);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "profile_not_found");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("sentiment"));

    let r = send(
        &s,
        "/v1/chat/completions",
        json!({"messages": msgs, "model": "tiny-q8_0:poetry"}),
        None,
    )
    .await;
    assert_eq!(r.status(), 404);

    let r = send(
        &s,
        "/v1/chat/completions",
        json!({"messages": msgs, "profile": "sentiment", "response_format": {"type": "json_object"}}),
        None,
    )
    .await;
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["param"], "profile");

    let r = send(
        &s,
        "/v1/chat/completions",
        json!({"messages": msgs, "profile": "sentiment"}),
        Some("chat"),
    )
    .await;
    assert_eq!(r.status(), 400);

    let r = send(
        &s,
        "/v1/completions",
        json!({"prompt": "x", "model": "tiny-q8_0:sentiment"}),
        None,
    )
    .await;
    assert_eq!(r.status(), 400);

    let r = send(
        &s,
        "/api/chat",
        json!({"model": "tiny-q8_0:poetry", "messages": msgs}),
        None,
    )
    .await;
    assert_eq!(r.status(), 404);
    let v: Value = r.json().await.unwrap();
    assert!(v["error"].as_str().unwrap().contains("poetry"), "{v}");
    s.stop(30);
}
