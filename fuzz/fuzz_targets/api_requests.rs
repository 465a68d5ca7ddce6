//! Any bytes as a request body of the OpenAI and Ollama APIs: parsing and the conversion to an
//! internal request (with its range checks) must return a request or an error, never panic.
#![no_main]

use tidepool_server::ollama::types::{ChatRequest, GenerateRequest, GenerationBody};
use tidepool_server::openai::types::{ChatCompletionRequest, CompletionRequest};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(r) = serde_json::from_slice::<ChatCompletionRequest>(data) {
        if let Ok(g) = r.to_generation() {
            let _ = g.check_bounds(4096);
        }
    }
    if let Ok(r) = serde_json::from_slice::<CompletionRequest>(data) {
        let _ = r.to_generations();
    }
    if let Ok(r) = serde_json::from_slice::<ChatRequest>(data) {
        let _ = r.to_generation();
    }
    if let Ok(r) = serde_json::from_slice::<GenerateRequest>(data) {
        let _ = r.to_generation();
    }
});
