//! `POST /v1/embeddings`, as OpenAI's API specifies it: `input` a string, a list of strings, a
//! list of token ids or a list of such lists; `encoding_format` `float` (default) or `base64`
//! (little-endian f32s, which the official Python client asks for by default); `dimensions`
//! only where it is the model's own width (a model that was not trained to be shortened cannot
//! be); unit-length vectors; `usage` with the tokens embedded.

use axum::extract::State;
use axum::Json;
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{json, Value};
use tidepool_engine::embed::{normalize, EmbedInput, EmbedRequest, MAX_INPUTS};
use tidepool_sched::queue::Class;

use super::check_model;
use crate::error::{ApiError, ApiJson};
use crate::selection::Selection;
use crate::AppState;

/// The largest `dimensions` taken seriously (no model is this wide).
const MAX_DIMENSIONS: u64 = 1 << 20;

/// The request body.
#[derive(Debug, Deserialize)]
pub struct EmbeddingRequest {
    pub input: Value,
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub encoding_format: Option<String>,
    #[serde(default)]
    pub dimensions: Option<Value>,
    #[serde(default)]
    pub user: Option<String>,
}

/// How the vectors are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Float,
    Base64,
}

impl EmbeddingRequest {
    /// The inputs, checked: never empty, at most [`MAX_INPUTS`], no empty string or token list.
    pub fn inputs(&self) -> Result<Vec<EmbedInput>, ApiError> {
        let bad = |m: String| ApiError::invalid_param("input", m);
        let empty = || bad("`input` must not be empty".into());
        let tokens = |v: &[Value], at: &str| -> Result<Vec<u32>, ApiError> {
            v.iter()
                .map(|t| {
                    t.as_u64()
                        .and_then(|t| u32::try_from(t).ok())
                        .ok_or_else(|| {
                            bad(format!(
                                "{at}: token ids are integers from 0 to {}",
                                u32::MAX
                            ))
                        })
                })
                .collect()
        };
        let inputs = match &self.input {
            Value::String(s) if s.is_empty() => return Err(empty()),
            Value::String(s) => vec![EmbedInput::Text(s.clone())],
            Value::Array(items) if items.is_empty() => return Err(empty()),
            Value::Array(items) if items.iter().all(Value::is_number) => {
                vec![EmbedInput::Tokens(tokens(items, "`input`")?)]
            }
            Value::Array(items) => items
                .iter()
                .enumerate()
                .map(|(i, item)| match item {
                    Value::String(s) if s.is_empty() => {
                        Err(bad(format!("`input[{i}]` must not be empty")))
                    }
                    Value::String(s) => Ok(EmbedInput::Text(s.clone())),
                    Value::Array(t) if t.is_empty() => {
                        Err(bad(format!("`input[{i}]` must not be empty")))
                    }
                    Value::Array(t) => Ok(EmbedInput::Tokens(tokens(t, &format!("`input[{i}]`"))?)),
                    _ => Err(bad(format!(
                        "`input[{i}]` must be a string or a list of token ids"
                    ))),
                })
                .collect::<Result<_, _>>()?,
            _ => {
                return Err(bad(
                    "`input` must be a string, a list of strings, or token ids".into(),
                ))
            }
        };
        if inputs.len() > MAX_INPUTS {
            return Err(bad(format!(
                "`input` has {} items; at most {MAX_INPUTS} are embedded at once",
                inputs.len()
            )));
        }
        Ok(inputs)
    }

    pub fn encoding(&self) -> Result<Encoding, ApiError> {
        match self.encoding_format.as_deref() {
            None | Some("float") => Ok(Encoding::Float),
            Some("base64") => Ok(Encoding::Base64),
            Some(other) => Err(ApiError::invalid_param(
                "encoding_format",
                format!(
                    "`encoding_format` must be `float` or `base64`, not `{}`",
                    crate::error::truncate(other, 40)
                ),
            )),
        }
    }

    /// `dimensions`, range-checked (`None`: the model's width).
    pub fn dimensions(&self) -> Result<Option<usize>, ApiError> {
        parse_dimensions(self.dimensions.as_ref())
            .map_err(|m| ApiError::invalid_param("dimensions", m))
    }
}

/// `dimensions` as both APIs take it: absent or null for the model's own width, else an integer
/// from 1 to [`MAX_DIMENSIONS`].
pub(crate) fn parse_dimensions(v: Option<&Value>) -> Result<Option<usize>, String> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .filter(|d| (1..=MAX_DIMENSIONS).contains(d))
            .map(|d| Some(d as usize))
            .ok_or_else(|| format!("`dimensions` must be an integer from 1 to {MAX_DIMENSIONS}")),
    }
}

/// Refuses `dimensions` other than the width of the vectors the model gave (none given: nothing
/// to check): a model not trained for shortened embeddings cannot give them.
pub(crate) fn check_width(dimensions: Option<usize>, vectors: &[Vec<f32>]) -> Result<(), String> {
    let Some(width) = vectors.first().map(Vec::len) else {
        return Ok(());
    };
    match dimensions.filter(|&d| d != width) {
        Some(d) => Err(format!(
            "this model's embeddings have {width} dimensions and cannot be shortened to {d}"
        )),
        None => Ok(()),
    }
}

/// A vector as the API writes it.
pub fn encode(v: &[f32], encoding: Encoding) -> Value {
    match encoding {
        Encoding::Float => json!(v),
        Encoding::Base64 => {
            let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
        }
    }
}

/// POST /v1/embeddings
pub async fn create(
    State(app): State<AppState>,
    selection: Selection,
    ApiJson(req): ApiJson<EmbeddingRequest>,
) -> Result<Json<Value>, ApiError> {
    let model = check_model(&app, req.model.as_deref())?;
    let inputs = req.inputs()?;
    let encoding = req.encoding()?;
    let dimensions = req.dimensions()?;
    let out = app
        .service
        .embed(
            selection.class.unwrap_or(Class::Standard),
            EmbedRequest {
                inputs,
                truncate: false,
            },
        )
        .await?;
    check_width(dimensions, &out.vectors).map_err(|m| ApiError::invalid_param("dimensions", m))?;
    let data: Vec<Value> = out
        .vectors
        .into_iter()
        .enumerate()
        .map(|(i, mut v)| {
            normalize(&mut v);
            json!({"object": "embedding", "index": i, "embedding": encode(&v, encoding)})
        })
        .collect();
    Ok(Json(json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": out.prompt_tokens, "total_tokens": out.prompt_tokens},
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(v: Value) -> EmbeddingRequest {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn every_input_shape_is_read_in_order() {
        assert_eq!(
            req(json!({"input": "hi"})).inputs().unwrap(),
            vec![EmbedInput::Text("hi".into())]
        );
        assert_eq!(
            req(json!({"input": ["a", "b"]})).inputs().unwrap(),
            vec![EmbedInput::Text("a".into()), EmbedInput::Text("b".into())]
        );
        assert_eq!(
            req(json!({"input": [1, 2, 3]})).inputs().unwrap(),
            vec![EmbedInput::Tokens(vec![1, 2, 3])]
        );
        assert_eq!(
            req(json!({"input": [[1], [2, 3]]})).inputs().unwrap(),
            vec![EmbedInput::Tokens(vec![1]), EmbedInput::Tokens(vec![2, 3])]
        );
    }

    #[test]
    fn bad_inputs_name_the_item() {
        for (input, says) in [
            (json!(""), "must not be empty"),
            (json!([]), "must not be empty"),
            (json!(["a", ""]), "`input[1]` must not be empty"),
            (json!([[]]), "`input[0]` must not be empty"),
            (json!([-1]), "token ids are integers"),
            (json!([1.5]), "token ids are integers"),
            (json!([4294967296u64]), "token ids are integers"),
            (json!(["a", 3]), "`input[1]` must be a string"),
            (json!({"text": "a"}), "must be a string"),
            (json!(7), "must be a string"),
        ] {
            let e = req(json!({ "input": input })).inputs().unwrap_err();
            assert_eq!(e.param.as_deref(), Some("input"));
            assert!(e.message.contains(says), "{input}: {}", e.message);
        }
        let many = vec!["x"; MAX_INPUTS + 1];
        assert!(req(json!({ "input": many })).inputs().is_err());
    }

    #[test]
    fn encoding_and_dimensions_are_checked() {
        assert_eq!(
            req(json!({"input": "a"})).encoding().unwrap(),
            Encoding::Float
        );
        assert_eq!(
            req(json!({"input": "a", "encoding_format": "base64"}))
                .encoding()
                .unwrap(),
            Encoding::Base64
        );
        assert!(req(json!({"input": "a", "encoding_format": "hex"}))
            .encoding()
            .is_err());
        assert_eq!(
            req(json!({"input": "a", "dimensions": 64}))
                .dimensions()
                .unwrap(),
            Some(64)
        );
        for bad in [
            json!(0),
            json!(-3),
            json!(1.5),
            json!("64"),
            json!(1u64 << 40),
        ] {
            let e = req(json!({"input": "a", "dimensions": bad}))
                .dimensions()
                .unwrap_err();
            assert_eq!(e.param.as_deref(), Some("dimensions"));
        }
    }

    #[test]
    fn base64_is_little_endian_f32() {
        let Value::String(s) = encode(&[1.0, -2.5], Encoding::Base64) else {
            panic!("a string")
        };
        let bytes = base64::engine::general_purpose::STANDARD.decode(s).unwrap();
        let back: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(back, vec![1.0, -2.5]);
    }
}
