//! The embedding endpoints end to end: the real server on the tiny fixture, a real HTTP client.
//! On llama.cpp: `/v1/embeddings` (float and base64, unit vectors, usage, errors in OpenAI's
//! shape), `/api/embed` and `/api/embeddings` (Ollama's shapes). On mistral.rs, which does not
//! embed here, every endpoint says so with a 400 in its API's shape.

use base64::Engine as _;
use serde_json::{json, Value};
use tidepool_engine::choice::EngineKind;
use tidepool_tests::{post_json, shared_tiny_server, test_engine};

const MODEL: &str = "tiny-q8_0";

async fn post(path: &str, body: Value) -> (u16, Value) {
    post_json(shared_tiny_server().url(path), &body).await
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn norm(v: &[f32]) -> f64 {
    v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt()
}

#[tokio::test]
async fn openai_embeddings_as_floats_and_base64() {
    let body = json!({"model": MODEL, "input": ["one fish", "two fish"]});
    let (status, v) = post("/v1/embeddings", body.clone()).await;
    if test_engine() == EngineKind::MistralRs {
        assert_eq!(status, 400, "{v}");
        assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("llama.cpp"),
            "{v}"
        );
        return;
    }
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "list");
    assert_eq!(v["model"], MODEL);
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    let first = floats(&data[0]["embedding"]);
    assert!(!first.is_empty());
    assert!((norm(&first) - 1.0).abs() < 1e-4);
    assert_eq!(data[1]["index"], 1);
    assert_eq!(data[1]["object"], "embedding");
    let tokens = v["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(tokens >= 4);
    assert_eq!(v["usage"]["total_tokens"], tokens);

    let mut b64 = body;
    b64["encoding_format"] = json!("base64");
    let (status, w) = post("/v1/embeddings", b64).await;
    assert_eq!(status, 200, "{w}");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(w["data"][0]["embedding"].as_str().unwrap())
        .unwrap();
    let decoded: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(decoded, first, "the same vector, base64-encoded");
}

#[tokio::test]
async fn openai_embedding_errors_are_openai_shaped() {
    for (body, param, status) in [
        (json!({"model": MODEL, "input": ""}), "input", 400),
        (json!({"model": MODEL, "input": [[]]}), "input", 400),
        (json!({"model": MODEL, "input": [-1]}), "input", 400),
        (
            json!({"model": MODEL, "input": "a", "encoding_format": "hex"}),
            "encoding_format",
            400,
        ),
        (
            json!({"model": MODEL, "input": "a", "dimensions": 0}),
            "dimensions",
            400,
        ),
        (json!({"model": "nope", "input": "a"}), "model", 404),
    ] {
        let (got, v) = post("/v1/embeddings", body.clone()).await;
        assert_eq!(got, status, "{body}: {v}");
        assert_eq!(v["error"]["param"], param, "{body}: {v}");
    }
    let (status, v) = post("/v1/embeddings", json!({"model": MODEL})).await;
    assert_eq!(status, 400, "no input: {v}");
    assert!(v["error"]["message"].is_string());
    if test_engine() == EngineKind::LlamaCpp {
        let (status, v) = post(
            "/v1/embeddings",
            json!({"model": MODEL, "input": "a", "dimensions": 3}),
        )
        .await;
        assert_eq!(status, 400, "{v}");
        assert!(v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("cannot be shortened"));
    }
}

#[tokio::test]
async fn ollama_embed_and_the_older_embeddings() {
    let (status, v) = post(
        "/api/embed",
        json!({"model": MODEL, "input": ["a b c", "d e"]}),
    )
    .await;
    if test_engine() == EngineKind::MistralRs {
        assert_eq!(status, 400, "{v}");
        assert!(v["error"].as_str().unwrap().contains("llama.cpp"), "{v}");
        return;
    }
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["model"], MODEL);
    let vectors = v["embeddings"].as_array().unwrap();
    assert_eq!(vectors.len(), 2);
    let first = floats(&vectors[0]);
    assert!((norm(&first) - 1.0).abs() < 1e-4);
    assert!(v["prompt_eval_count"].as_u64().unwrap() >= 3);
    assert!(v["total_duration"].as_u64().unwrap() > 0);

    let (status, old) = post(
        "/api/embeddings",
        json!({"model": MODEL, "prompt": "a b c"}),
    )
    .await;
    assert_eq!(status, 200, "{old}");
    let raw = floats(&old["embedding"]);
    assert_eq!(raw.len(), first.len());
    let n = norm(&raw);
    let cos = raw
        .iter()
        .zip(&first)
        .map(|(a, b)| f64::from(*a) * f64::from(*b))
        .sum::<f64>()
        / n;
    assert!(
        cos > 0.9999,
        "the same direction, not normalized: cos {cos}"
    );

    let (status, empty) = post("/api/embed", json!({"model": MODEL, "input": ""})).await;
    assert_eq!(status, 200, "{empty}");
    assert_eq!(empty["embeddings"], json!([]));
    let (status, empty) = post("/api/embeddings", json!({"model": MODEL, "prompt": ""})).await;
    assert_eq!(status, 200, "{empty}");
    assert_eq!(empty["embedding"], json!([]));

    for bad in [
        json!({"input": "a"}),
        json!({"model": MODEL, "input": [1]}),
        json!({"model": MODEL, "input": "a", "keep_alive": "soon"}),
    ] {
        let (status, e) = post("/api/embed", bad.clone()).await;
        assert_eq!(status, 400, "{bad}: {e}");
        assert!(e["error"].is_string(), "{bad}: {e}");
    }
}
