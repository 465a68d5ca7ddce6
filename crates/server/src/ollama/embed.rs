//! Ollama's embedding endpoints: `POST /api/embed` (`input` a string or a list of strings,
//! `truncate` on by default, unit-length vectors, timings and `prompt_eval_count`) and the older
//! `POST /api/embeddings` (one `prompt`, the vector as the model pooled it, not normalized).
//! Both take `keep_alive` as the generating endpoints do.

use std::time::Instant;

use axum::extract::State;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use tidepool_engine::embed::{normalize, EmbedInput, EmbedRequest, MAX_INPUTS};
use tidepool_sched::queue::Class;

use super::types::{KeepAlive, OllamaJson};
use super::{apply_keep_alive, check_model, ns, OllamaSelection};
use crate::error::OllamaError;
use crate::guard::Peer;
use crate::openai::embeddings::{check_width, parse_dimensions};
use crate::AppState;

/// POST /api/embed
#[derive(Debug, Deserialize)]
pub struct EmbedBody {
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub input: Option<Value>,
    #[serde(default)]
    pub truncate: Option<bool>,
    #[serde(default)]
    pub dimensions: Option<Value>,
    #[serde(default)]
    pub keep_alive: Option<KeepAlive>,
    #[serde(default)]
    pub options: Option<Value>,
}

/// POST /api/embeddings
#[derive(Debug, Deserialize)]
pub struct EmbeddingsBody {
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub prompt: Option<String>,
    #[serde(default)]
    pub keep_alive: Option<KeepAlive>,
    #[serde(default)]
    pub options: Option<Value>,
}

impl EmbedBody {
    /// The texts to embed; an empty string (or no `input`) is nothing to embed, as in Ollama.
    pub fn texts(&self) -> Result<Vec<String>, OllamaError> {
        let texts = match &self.input {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::String(s)) if s.is_empty() => Vec::new(),
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(items)) => items
                .iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Value::String(s) if !s.is_empty() => Ok(s.clone()),
                    Value::String(_) => Err(OllamaError::bad_request(format!(
                        "input[{i}] must not be empty"
                    ))),
                    _ => Err(OllamaError::bad_request(format!(
                        "invalid input type: input[{i}] must be a string"
                    ))),
                })
                .collect::<Result<_, _>>()?,
            Some(_) => {
                return Err(OllamaError::bad_request(
                    "invalid input type: input must be a string or a list of strings",
                ))
            }
        };
        if texts.len() > MAX_INPUTS {
            return Err(OllamaError::bad_request(format!(
                "input has {} items; at most {MAX_INPUTS} are embedded at once",
                texts.len()
            )));
        }
        Ok(texts)
    }

    /// `dimensions`, range-checked (`None`: the model's width).
    pub fn dimensions(&self) -> Result<Option<usize>, OllamaError> {
        parse_dimensions(self.dimensions.as_ref()).map_err(OllamaError::bad_request)
    }
}

/// Embeds `texts` on the served model (loading it first if the pool is at zero).
async fn run(
    app: &AppState,
    class: Option<Class>,
    texts: Vec<String>,
    truncate: bool,
) -> Result<tidepool_engine::embed::Embeddings, OllamaError> {
    Ok(app
        .service
        .embed(
            class.unwrap_or(Class::Standard),
            EmbedRequest {
                inputs: texts.into_iter().map(EmbedInput::Text).collect(),
                truncate,
            },
        )
        .await?)
}

/// POST /api/embed
pub async fn embed(
    State(app): State<AppState>,
    Peer(peer): Peer,
    OllamaSelection(selection): OllamaSelection,
    OllamaJson(req): OllamaJson<EmbedBody>,
) -> Result<Json<Value>, OllamaError> {
    let started = Instant::now();
    let (model, _) = check_model(&app, req.model.as_deref(), None, &selection)?;
    let texts = req.texts()?;
    let dimensions = req.dimensions()?;
    if let Some(k) = &req.keep_alive {
        k.setting()?;
    }
    let (vectors, tokens) = if texts.is_empty() {
        (Vec::new(), 0)
    } else {
        let out = run(&app, selection.class, texts, req.truncate.unwrap_or(true)).await?;
        (out.vectors, out.prompt_tokens)
    };
    apply_keep_alive(&app, &req.keep_alive, peer)?;
    check_width(dimensions, &vectors).map_err(OllamaError::bad_request)?;
    let embeddings: Vec<Vec<f32>> = vectors
        .into_iter()
        .map(|mut v| {
            normalize(&mut v);
            v
        })
        .collect();
    Ok(Json(json!({
        "model": model,
        "embeddings": embeddings,
        "total_duration": ns(started.elapsed()),
        "load_duration": 0,
        "prompt_eval_count": tokens,
    })))
}

/// POST /api/embeddings (the older endpoint)
pub async fn embeddings(
    State(app): State<AppState>,
    Peer(peer): Peer,
    OllamaSelection(selection): OllamaSelection,
    OllamaJson(req): OllamaJson<EmbeddingsBody>,
) -> Result<Json<Value>, OllamaError> {
    check_model(&app, req.model.as_deref(), None, &selection)?;
    if let Some(k) = &req.keep_alive {
        k.setting()?;
    }
    let prompt = req.prompt.unwrap_or_default();
    let embedding = if prompt.is_empty() {
        Vec::new()
    } else {
        let out = run(&app, selection.class, vec![prompt], true).await?;
        out.vectors.into_iter().next().unwrap_or_default()
    };
    apply_keep_alive(&app, &req.keep_alive, peer)?;
    Ok(Json(json!({ "embedding": embedding })))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(v: Value) -> EmbedBody {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn inputs_as_ollama_reads_them() {
        assert!(body(json!({"model": "m"})).texts().unwrap().is_empty());
        assert!(body(json!({"model": "m", "input": ""}))
            .texts()
            .unwrap()
            .is_empty());
        assert_eq!(body(json!({"input": "a"})).texts().unwrap(), vec!["a"]);
        assert_eq!(
            body(json!({"input": ["a", "b"]})).texts().unwrap(),
            vec!["a", "b"]
        );
        for bad in [json!(["a", 1]), json!(["a", ""]), json!(5), json!({"a": 1})] {
            assert!(body(json!({ "input": bad })).texts().is_err(), "{bad}");
        }
        assert!(body(json!({"input": "a", "dimensions": 0}))
            .dimensions()
            .is_err());
        assert_eq!(
            body(json!({"input": "a", "dimensions": 8}))
                .dimensions()
                .unwrap(),
            Some(8)
        );
    }
}
