//! [`Engine`] over mistral.rs: one in-process `mistralrs::Model` loaded from local GGUF file(s).
//!
//! Every generation runs as a streaming request inside mistral.rs, also when the client asked for
//! one JSON body: the stream gives time-to-first-token. Dropping the stream winds the sequence
//! down (see [`super::token_tap`]): its response channel is kept, and drained, until mistral.rs
//! has sent its last response, because mistral.rs 0.8.1 panics its engine thread when it answers
//! a request whose receiver is gone (`engine/add_request.rs:808` for a tokenization,
//! `utils/mod.rs:183` for a failed batch). For the same reason every tokenization runs in a
//! detached task that outlives its caller.
//!
//! Tidepool also does here what mistral.rs 0.8.1 does not: stop strings cut the streamed text
//! at the match ([`super::text_out`]), a named `tool_choice` is constrained by a grammar so the
//! call always comes, and special tokens typed into messages are neutralized
//! ([`super::special_tokens`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use either::Either;
use futures::future::BoxFuture;
use futures::StreamExt;
use indexmap::IndexMap;
use mistralrs::core::{RequestMessage, TokenizationRequest};
use mistralrs::{
    Constraint, GgufModelBuilder, MessageContent, NormalRequest, Request, Response, SamplingParams,
    StopTokens, TokenSource,
};
use tokio::sync::mpsc;

use super::logit_bias::{check_logit_bias, LogitBias};
use super::seeded::SeededSampler;
use super::text_out::{Step, TextOut};
use super::token_tap::{TapCounts, TokenTap};
use super::{
    DeviceInfo, DevicePreference, Engine, EngineConfig, EngineError, EngineInfo, GenerationStream,
};
use crate::request::{
    ChatMessage, FinishReason, GenerationEvent, GenerationRequest, OutputConstraint, Prompt, Role,
    Sampling, ToolCall, ToolChoice, ToolSpec, Usage,
};
use tidepool_models::catalog::DeviceClass;
use tidepool_models::gguf_info::GgufInfo;
use tidepool_models::model_source::LocalModel;

/// Whether this build can run on a GPU here (a `cuda` or `metal` build on a machine that has one).
pub fn gpu_available() -> bool {
    if !cfg!(any(feature = "cuda", feature = "metal")) {
        return false;
    }
    mistralrs::best_device(false).is_ok_and(|d| !d.is_cpu())
}

/// A mistral.rs model instance.
pub struct MistralEngine {
    model: mistralrs::Model,
    sender: mpsc::Sender<Request>,
    info: EngineInfo,
}

impl MistralEngine {
    /// Makes mistral.rs 0.8.1's engine thread panic the way a client hang-up used to (it answers
    /// a tokenization whose receiver is gone: `engine/add_request.rs:808`), and waits until the
    /// thread is gone. Tests of what a dead engine does.
    #[cfg(test)]
    pub(crate) async fn crash(&self) {
        let (tx, rx) = mpsc::channel(1);
        drop(rx);
        let _ = self
            .sender
            .send(Request::Tokenize(plain_text("crash".into(), tx)))
            .await;
        self.sender.closed().await;
    }
}

/// Tokenizing `text` as it is: no template, no special tokens added.
fn plain_text(
    text: String,
    response: mpsc::Sender<anyhow::Result<Vec<u32>>>,
) -> TokenizationRequest {
    TokenizationRequest {
        text: Either::Right(text),
        tools: None,
        add_generation_prompt: false,
        add_special_tokens: false,
        enable_thinking: None,
        reasoning_effort: None,
        response,
    }
}

/// Sends a tokenization request and waits for its answer in a task of its own, so the receiver
/// lives until mistral.rs answers even when the caller is dropped (mistral.rs panics when it
/// answers a dropped receiver).
async fn tokenize_detached(
    sender: &mpsc::Sender<Request>,
    make: impl FnOnce(mpsc::Sender<anyhow::Result<Vec<u32>>>) -> TokenizationRequest,
) -> Result<Vec<u32>, EngineError> {
    let (tx, mut rx) = mpsc::channel(1);
    sender
        .send(Request::Tokenize(make(tx)))
        .await
        .map_err(|_| EngineError::Unavailable("the engine has stopped".into()))?;
    let answer = tokio::spawn(async move { rx.recv().await });
    match answer.await {
        Ok(Some(Ok(tokens))) => Ok(tokens),
        Ok(Some(Err(e))) => Err(EngineError::Invalid(format!("{e:#}"))),
        Ok(None) | Err(_) => Err(unanswered(sender).await),
    }
}

/// Why mistral.rs dropped a request without a single answer: its engine thread is going down (a
/// panic drops every request it holds). Waits, at most a second, for the thread to close its
/// channel, so [`Engine::health`] already says so when the caller gives the slot back and the
/// pool looks.
async fn unanswered(sender: &mpsc::Sender<Request>) -> EngineError {
    let closed = tokio::time::timeout(Duration::from_secs(1), sender.closed()).await;
    EngineError::Unavailable(if closed.is_ok() {
        "the engine has stopped".into()
    } else {
        "mistral.rs dropped the request without an answer".into()
    })
}

impl MistralEngine {
    /// Loads `model` (blocking work runs on mistral.rs's own threads).
    pub async fn load(
        model: &LocalModel,
        cfg: &EngineConfig,
    ) -> Result<MistralEngine, EngineError> {
        let load_err = |message: String| EngineError::Load {
            model: model.name.clone(),
            message,
        };
        let gguf = GgufInfo::read_cached(&model.files).map_err(|e| load_err(e.to_string()))?;
        let first = &model.files[0];
        let dir = first
            .parent()
            .map(|d| d.to_path_buf())
            .unwrap_or_else(|| ".".into());
        let names: Vec<String> = model
            .files
            .iter()
            .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        let force_cpu = cfg.device == DevicePreference::Cpu || !gpu_available();
        let mut builder = GgufModelBuilder::new(dir.to_string_lossy(), names)
            .with_token_source(TokenSource::None)
            .with_max_num_seqs(cfg.max_sequences.max(1))
            .with_prefix_cache_n(
                (cfg.prefix_cache_entries > 0).then_some(cfg.prefix_cache_entries),
            );
        if force_cpu {
            builder = builder.with_force_cpu();
        }
        let started = Instant::now();
        let built = builder
            .build()
            .await
            .map_err(|e| load_err(format!("{e:#}")))?;
        let sender = built
            .inner()
            .get_sender(None)
            .map_err(|e| load_err(e.to_string()))?;
        let config = built.config().map_err(|e| load_err(e.to_string()))?;
        let device = &config.device;
        let device_info = DeviceInfo {
            name: match device.location() {
                candle_core::DeviceLocation::Cpu => "cpu".to_string(),
                candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
                candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
            },
            class: if device.is_cpu() {
                DeviceClass::Cpu
            } else {
                DeviceClass::Gpu
            },
        };
        let max_sequence_length = config
            .max_seq_len
            .unwrap_or(gguf.shape.context_length as usize);
        tracing::info!(
            model = %model.name,
            device = %device_info.name,
            load_s = started.elapsed().as_secs_f64(),
            "engine ready"
        );
        Ok(MistralEngine {
            model: built,
            sender,
            info: EngineInfo {
                model: model.name.clone(),
                device: device_info,
                max_sequence_length,
                max_sequences: cfg.max_sequences.max(1),
                gguf,
                backend: "mistral.rs",
                threads: None,
                // Each instance loads its own pipeline; docs/elasticity.md says why.
                shares_weights: false,
                own_memory: None,
            },
        })
    }

    async fn tokenize(&self, prompt: &Prompt, tools: &[ToolSpec]) -> Result<Vec<u32>, EngineError> {
        let (prompt, tools) = self.safe(prompt, tools);
        let text = match &prompt {
            Prompt::Chat(messages) => Either::Left(to_mistral_messages(messages)),
            Prompt::Text(t) => Either::Right(t.clone()),
        };
        let tools = (!tools.is_empty()).then(|| tools.iter().map(to_mistral_tool).collect());
        tokenize_detached(&self.sender, |response| TokenizationRequest {
            text,
            tools,
            add_generation_prompt: true,
            add_special_tokens: true,
            enable_thinking: None,
            reasoning_effort: None,
            response,
        })
        .await
    }

    /// The prompt and tools with client text neutralized (special-token spellings broken), as
    /// mistral.rs will tokenize them.
    fn safe(&self, prompt: &Prompt, tools: &[ToolSpec]) -> (Prompt, Vec<ToolSpec>) {
        let specials = &self.info.gguf.special_tokens;
        let mut tools = tools.to_vec();
        let prompt = match prompt {
            Prompt::Chat(m) => {
                let mut m = m.clone();
                super::special_tokens::neutralize_request(&mut m, &mut tools, specials, true);
                Prompt::Chat(m)
            }
            // A raw prompt is the client's own template.
            Prompt::Text(t) => Prompt::Text(t.clone()),
        };
        (prompt, tools)
    }
}

impl Drop for MistralEngine {
    fn drop(&mut self) {
        tracing::debug!(model = %self.info.model, "engine dropped");
    }
}

impl Engine for MistralEngine {
    fn info(&self) -> &EngineInfo {
        &self.info
    }

    fn health(&self) -> super::Health {
        if self.sender.is_closed() {
            super::Health::Dead(
                "mistral.rs's engine thread stopped (it panicked or was shut down)".into(),
            )
        } else {
            super::Health::Ok
        }
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            // The engine thread returns from its loop and drops its receiver: `health` says dead.
            if self.sender.send(Request::Terminate).await.is_ok() {
                self.sender.closed().await;
            }
        })
    }

    fn probe(&self) -> BoxFuture<'_, Result<(), EngineError>> {
        Box::pin(async move {
            tokenize_detached(&self.sender, |response| plain_text("ping".into(), response))
                .await
                .map(|_| ())
        })
    }

    fn count_tokens<'a>(
        &'a self,
        prompt: &'a Prompt,
        tools: &'a [ToolSpec],
    ) -> BoxFuture<'a, Result<u32, EngineError>> {
        Box::pin(async move { Ok(self.tokenize(prompt, tools).await?.len() as u32) })
    }

    fn generate(
        &self,
        request: GenerationRequest,
    ) -> BoxFuture<'_, Result<GenerationStream, EngineError>> {
        Box::pin(async move {
            check_logit_bias(&request.sampling, self.info.gguf.shape.vocab)?;
            // A grammar mistral.rs cannot run fails its whole batch mid-step: refuse it now.
            let constrained =
                request.constraint != OutputConstraint::None || request.tool_choice.forces_a_call();
            if constrained {
                let checked = request.clone();
                tokio::task::spawn_blocking(move || super::grammar::check(&checked))
                    .await
                    .map_err(|e| {
                        EngineError::Internal(format!("checking the grammar failed: {e}"))
                    })??;
            }
            let (prompt, tools) = self.safe(&request.prompt, &request.tools);
            let request = GenerationRequest {
                prompt,
                tools,
                ..request
            };
            // Raw-text completions stream chunks without usage: count the prompt up front.
            let completion_prompt_tokens = match &request.prompt {
                Prompt::Text(_) => Some(self.tokenize(&request.prompt, &[]).await?.len() as u32),
                Prompt::Chat(_) => None,
            };
            let (tx, rx) = mpsc::channel(256);
            let tap = TokenTap {
                eos: self.info.gguf.eos_token_id,
                ..TokenTap::default()
            };
            let counts = tap.counts.clone();
            let normal = build_request(&request, tx, self.model.inner().next_request_id(), tap)?;
            let started = Instant::now();
            self.sender
                .send(Request::Normal(Box::new(normal)))
                .await
                .map_err(|_| EngineError::Unavailable("the engine has stopped".into()))?;
            // From here mistral.rs owns a sender to `rx`: a task of its own holds `rx` until the
            // last response (see the module doc), forwarding into an unbounded buffer (at most
            // `max_tokens` chunks) so a slow client never stalls mistral.rs's engine loop, which
            // awaits each send. When the buffer's reader is gone, it winds the sequence down.
            let (buf_tx, mut buf_rx) = mpsc::unbounded_channel();
            tokio::spawn(forward(rx, buf_tx, counts.clone()));
            // Validation errors (bad grammar, prompt too long) arrive before any token: report
            // them as errors of the call, not of the stream.
            let first = match buf_rx.recv().await {
                None => return Err(unanswered(&self.sender).await),
                Some(Response::ValidationError(e)) => {
                    return Err(EngineError::Invalid(e.to_string()))
                }
                Some(Response::InternalError(e))
                    if constrained && is_grammar_error(&e.to_string()) =>
                {
                    return Err(EngineError::Invalid(format!(
                        "{}{}",
                        super::grammar::FAILED,
                        tidepool_bounds::clip(&e.to_string())
                    )))
                }
                Some(Response::InternalError(e)) => {
                    return Err(EngineError::Internal(e.to_string()))
                }
                Some(r) => r,
            };
            let state = StreamState {
                constrained,
                rx: buf_rx,
                pending: Some(first),
                started,
                first_text: None,
                completion_text: completion_prompt_tokens.map(|_| String::new()),
                completion_prompt_tokens,
                counts,
                max_tokens: request.sampling.max_tokens,
                text: TextOut::new(&request.sampling.stop),
                tokenizer: TokenCounter {
                    sender: self.sender.clone(),
                },
                finished: false,
            };
            Ok(futures::stream::unfold(state, next_event)
                .flat_map(futures::stream::iter)
                .boxed())
        })
    }
}

/// Whether `r` is the last response mistral.rs sends for a request.
fn is_final(r: &Response) -> bool {
    match r {
        Response::Chunk(c) => c.choices.iter().any(|ch| ch.finish_reason.is_some()),
        Response::CompletionChunk(c) => c.choices.iter().any(|ch| ch.finish_reason.is_some()),
        _ => true,
    }
}

/// Holds a request's response channel until mistral.rs is done with it, forwarding into `buf`
/// while someone reads it and winding the sequence down once nobody does.
async fn forward(
    mut rx: mpsc::Receiver<Response>,
    buf: mpsc::UnboundedSender<Response>,
    counts: Arc<TapCounts>,
) {
    let mut reader = true;
    while let Some(r) = rx.recv().await {
        let last = is_final(&r);
        if reader && buf.send(r).is_err() {
            reader = false;
            counts.wind_down();
        }
        if last {
            break;
        }
    }
}

/// Counts tokens of generated text for raw completions (whose stream carries no usage).
struct TokenCounter {
    sender: mpsc::Sender<Request>,
}

impl TokenCounter {
    async fn count(&self, text: &str) -> u32 {
        let text = text.to_string();
        tokenize_detached(&self.sender, |response| plain_text(text, response))
            .await
            .map_or(0, |t| t.len() as u32)
    }
}

struct StreamState {
    /// The request has an output constraint (so a parser error is the constraint's).
    constrained: bool,
    rx: mpsc::UnboundedReceiver<Response>,
    /// Stop strings: text that may begin one is held back, and the answer ends at a match.
    text: TextOut,
    pending: Option<Response>,
    started: Instant,
    first_text: Option<Instant>,
    /// Collected text of a raw completion, to count its tokens at the end.
    completion_text: Option<String>,
    completion_prompt_tokens: Option<u32>,
    /// Tokens seen inside the engine, for a generation whose final chunk never comes.
    counts: Arc<TapCounts>,
    max_tokens: Option<u32>,
    tokenizer: TokenCounter,
    finished: bool,
}

/// Turns the next engine response into zero or more events.
async fn next_event(mut st: StreamState) -> Option<(Vec<GenerationEvent>, StreamState)> {
    if st.finished {
        return None;
    }
    let resp = match st.pending.take() {
        Some(r) => r,
        None => match st.rx.recv().await {
            Some(r) => r,
            None => {
                st.finished = true;
                if st.tokenizer.sender.is_closed() {
                    return Some((
                        vec![GenerationEvent::Error(
                            "the engine stopped mid-generation".into(),
                        )],
                        st,
                    ));
                }
                // The sequence ended on a held-back partial character and mistral.rs dropped its
                // final chunk (see `token_tap`): finish it here from the tapped counts.
                let generated = st.counts.generated_tokens();
                let reason = match st.max_tokens {
                    Some(m) if generated >= m => FinishReason::Length,
                    _ => FinishReason::Stop,
                };
                let now = Instant::now();
                let usage = Usage {
                    prompt_tokens: st
                        .completion_prompt_tokens
                        .or(st.counts.prompt_tokens())
                        .unwrap_or(0),
                    completion_tokens: generated,
                    time_to_first_token: st.first_text.unwrap_or(now) - st.started,
                    total_time: now - st.started,
                };
                return Some((
                    vec![GenerationEvent::Done {
                        finish_reason: reason,
                        usage,
                    }],
                    st,
                ));
            }
        },
    };
    let mut events = Vec::new();
    let mut finish: Option<(String, Option<mistralrs::Usage>)> = None;
    let mut stopped = false;
    match resp {
        Response::Chunk(chunk) => {
            if let Some(choice) = chunk.choices.into_iter().next() {
                if let Some(text) = choice.delta.content.filter(|t| !t.is_empty()) {
                    stopped = push_text(&mut st.text, &text, &mut events);
                }
                if let Some(calls) = choice.delta.tool_calls.filter(|c| !c.is_empty()) {
                    events.push(GenerationEvent::ToolCalls(
                        calls
                            .into_iter()
                            .map(|c| ToolCall {
                                id: c.id,
                                name: c.function.name,
                                arguments: c.function.arguments,
                            })
                            .collect(),
                    ));
                }
                if let Some(reason) = choice.finish_reason {
                    finish = Some((reason, chunk.usage));
                }
            }
        }
        Response::CompletionChunk(chunk) => {
            if let Some(choice) = chunk.choices.into_iter().next() {
                if !choice.text.is_empty() {
                    let before = events.len();
                    stopped = push_text(&mut st.text, &choice.text, &mut events);
                    if let Some(all) = st.completion_text.as_mut() {
                        for e in &events[before..] {
                            if let GenerationEvent::Text(t) = e {
                                all.push_str(t);
                            }
                        }
                    }
                }
                if let Some(reason) = choice.finish_reason {
                    finish = Some((reason, None));
                }
            }
        }
        Response::Done(done) => {
            // Not expected for streaming requests; handle it anyway.
            if let Some(choice) = done.choices.into_iter().next() {
                if let Some(text) = choice.message.content.filter(|t| !t.is_empty()) {
                    events.push(GenerationEvent::Text(text));
                }
                finish = Some((choice.finish_reason, Some(done.usage)));
            }
        }
        Response::ModelError(msg, _) | Response::CompletionModelError(msg, _) => {
            st.finished = true;
            return Some((vec![GenerationEvent::Error(st.classify(msg))], st));
        }
        Response::InternalError(e) | Response::ValidationError(e) => {
            st.finished = true;
            return Some((vec![GenerationEvent::Error(st.classify(e.to_string()))], st));
        }
        _ => {
            st.finished = true;
            return Some((
                vec![GenerationEvent::Error(
                    "unexpected response kind from the engine".into(),
                )],
                st,
            ));
        }
    }
    if stopped {
        // A stop string matched: the answer ends here, whatever mistral.rs does next (it winds
        // down once this stream is dropped).
        finish = Some(("stop".into(), None));
    } else if finish.is_some() {
        let rest = st.text.finish();
        if !rest.is_empty() {
            if let Some(all) = st.completion_text.as_mut() {
                all.push_str(&rest);
            }
            events.push(GenerationEvent::Text(rest));
        }
    }
    if st.first_text.is_none()
        && events
            .iter()
            .any(|e| matches!(e, GenerationEvent::Text(_) | GenerationEvent::ToolCalls(_)))
    {
        st.first_text = Some(Instant::now());
    }
    if let Some((reason, usage)) = finish {
        let now = Instant::now();
        let (prompt_tokens, completion_tokens) = match (usage, st.completion_prompt_tokens) {
            (Some(u), _) => (u.prompt_tokens as u32, u.completion_tokens as u32),
            (None, Some(p)) => {
                let text = st.completion_text.take().unwrap_or_default();
                (p, st.tokenizer.count(&text).await)
            }
            (None, None) => (
                st.counts.prompt_tokens().unwrap_or(0),
                st.counts.generated_tokens(),
            ),
        };
        let usage = Usage {
            prompt_tokens,
            completion_tokens,
            time_to_first_token: st.first_text.unwrap_or(now) - st.started,
            total_time: now - st.started,
        };
        events.push(GenerationEvent::Done {
            finish_reason: match stopped {
                true => st.text.stop_reason(),
                false => map_finish_reason(&reason),
            },
            usage,
        });
        st.finished = true;
    }
    Some((events, st))
}

/// Whether an engine error comes from the grammar (llguidance's parser or lexer).
fn is_grammar_error(msg: &str) -> bool {
    let m = msg.to_ascii_lowercase();
    [
        "parser error",
        "lexer",
        "grammar",
        "llguidance",
        "too many items",
    ]
    .iter()
    .any(|k| m.contains(k))
}

impl StreamState {
    /// A failure of a constrained generation that the grammar caused is reported as such.
    fn classify(&self, msg: String) -> String {
        if self.constrained && is_grammar_error(&msg) {
            format!("{}{}", super::grammar::FAILED, tidepool_bounds::clip(&msg))
        } else {
            msg
        }
    }
}

/// Passes one text delta through the stop-string filter into `events`; `true` when a stop string
/// matched (the text before it is in `events`, the rest is dropped).
fn push_text(out: &mut TextOut, text: &str, events: &mut Vec<GenerationEvent>) -> bool {
    let (sent, stopped) = match out.push(text.as_bytes()) {
        Step::Text(t) => (t, false),
        Step::Stop(t) => (t, true),
    };
    if !sent.is_empty() {
        events.push(GenerationEvent::Text(sent));
    }
    stopped
}

fn map_finish_reason(s: &str) -> FinishReason {
    match s {
        "length" => FinishReason::Length,
        "tool_calls" => FinishReason::ToolCalls,
        "canceled" | "cancelled" => FinishReason::Cancelled,
        _ => FinishReason::Stop,
    }
}

fn build_request(
    req: &GenerationRequest,
    tx: mpsc::Sender<Response>,
    id: usize,
    tap: TokenTap,
) -> Result<NormalRequest, EngineError> {
    let messages = match &req.prompt {
        Prompt::Chat(m) => {
            if m.is_empty() {
                return Err(EngineError::Invalid("`messages` must not be empty".into()));
            }
            RequestMessage::Chat {
                messages: to_mistral_messages(m),
                enable_thinking: None,
                reasoning_effort: None,
            }
        }
        Prompt::Text(t) => RequestMessage::Completion {
            text: t.clone(),
            echo_prompt: false,
            best_of: None,
        },
    };
    let (sampling_params, sampler) = to_sampling(&req.sampling);
    let counts = tap.counts.clone();
    let mut processors: Vec<Arc<dyn mistralrs::CustomLogitsProcessor>> = vec![Arc::new(tap)];
    if !req.sampling.logit_bias.is_empty() {
        // A client's bias may ban the end token; once the client is gone it must not keep the
        // sequence running to max_tokens.
        processors.push(Arc::new(UntilWindDown {
            inner: LogitBias(req.sampling.logit_bias.clone()),
            counts,
        }));
    }
    processors.extend(sampler);
    let forced = match (&req.constraint, &req.tool_choice) {
        (OutputConstraint::None, choice) if !req.tools.is_empty() && choice.forces_a_call() => {
            Some(super::forced_call_lark(&req.tools, choice)?)
        }
        _ => None,
    };
    let constraint = match (&req.constraint, forced) {
        // A named tool: the grammar writes the call, mistral.rs's parser turns it into one.
        (_, Some(call)) => Constraint::Lark(call),
        (OutputConstraint::None, None) => Constraint::None,
        (OutputConstraint::JsonObject, None) => Constraint::JsonSchema(super::compact_json_schema(
            &serde_json::json!({"type": "object"}),
        )),
        (OutputConstraint::JsonSchema(s), None) => {
            Constraint::JsonSchema(super::compact_json_schema(s))
        }
        (OutputConstraint::Regex(r), None) => Constraint::Regex(r.clone()),
        (OutputConstraint::Lark(g), None) => Constraint::Lark(g.clone()),
    };
    let (tools, tool_choice) = if req.tools.is_empty() || req.tool_choice == ToolChoice::None {
        (None, None)
    } else {
        let tools: Vec<mistralrs::Tool> = req.tools.iter().map(to_mistral_tool).collect();
        // mistral.rs's own `ToolChoice::Tool` constrains nothing and fails the whole batch when
        // the model does not call the tool (`tools/mod.rs:470`); the grammar above forces the
        // call, and `Auto` lets mistral.rs parse it.
        let choice = mistralrs::ToolChoice::Auto;
        (Some(tools), Some(choice))
    };
    Ok(NormalRequest {
        messages,
        sampling_params,
        response: tx,
        return_logprobs: false,
        is_streaming: true,
        id,
        constraint,
        suffix: None,
        tools,
        tool_choice,
        logits_processors: Some(processors),
        return_raw_logits: false,
        web_search_options: None,
        model_id: None,
        truncate_sequence: false,
    })
}

/// A logits processor that stops applying once its generation winds down (its client is gone).
struct UntilWindDown<P> {
    inner: P,
    counts: Arc<TapCounts>,
}

impl<P: mistralrs::CustomLogitsProcessor> mistralrs::CustomLogitsProcessor for UntilWindDown<P> {
    fn apply(
        &self,
        logits: &candle_core::Tensor,
        context: &[u32],
    ) -> candle_core::Result<candle_core::Tensor> {
        if self.counts.is_winding_down() {
            return Ok(logits.clone());
        }
        self.inner.apply(logits, context)
    }
}

/// mistral.rs sampling parameters, plus Tidepool's own sampler for seeded requests.
fn to_sampling(
    s: &Sampling,
) -> (
    SamplingParams,
    Option<Arc<dyn mistralrs::CustomLogitsProcessor>>,
) {
    let mut p = SamplingParams::neutral();
    p.max_len = s.max_tokens.map(|m| m as usize);
    p.presence_penalty = s.presence_penalty;
    p.frequency_penalty = s.frequency_penalty;
    p.repetition_penalty = s.repetition_penalty;
    if !s.stop.is_empty() {
        p.stop_toks = Some(StopTokens::Seqs(s.stop.clone()));
    }
    let temperature = s.temperature.unwrap_or(1.0);
    // mistral.rs reads an unset temperature as 1.0; only an explicit 0 selects its argmax path.
    p.temperature = Some(0.0);
    if temperature <= 0.0 {
        return (p, None);
    }
    match s.seed {
        Some(seed) => {
            // The engine runs greedy over logits the seeded sampler has reduced to one token.
            let sampler = SeededSampler {
                seed,
                temperature,
                top_k: s.top_k.map(|k| k as usize),
                top_p: s.top_p,
            };
            (p, Some(Arc::new(sampler)))
        }
        None => {
            p.temperature = Some(temperature as f64);
            p.top_p = s.top_p.map(|v| v as f64);
            p.top_k = s.top_k.map(|k| k as usize);
            (p, None)
        }
    }
}

fn to_mistral_tool(t: &ToolSpec) -> mistralrs::Tool {
    let parameters: Option<HashMap<String, serde_json::Value>> = t
        .parameters
        .as_ref()
        .and_then(|p| p.as_object())
        .map(|o| o.iter().map(|(k, v)| (k.clone(), v.clone())).collect());
    mistralrs::Tool {
        tp: mistralrs::ToolType::Function,
        function: mistralrs::Function {
            description: t.description.clone(),
            name: t.name.clone(),
            parameters,
        },
    }
}

fn to_mistral_messages(messages: &[ChatMessage]) -> Vec<IndexMap<String, MessageContent>> {
    messages
        .iter()
        .map(|m| {
            let mut map: IndexMap<String, MessageContent> = IndexMap::new();
            map.insert("role".into(), Either::Left(m.role.as_str().to_string()));
            map.insert("content".into(), Either::Left(m.content.clone()));
            if m.role == Role::Assistant && !m.tool_calls.is_empty() {
                let calls = m
                    .tool_calls
                    .iter()
                    .map(|c| {
                        // Chat templates expect arguments as an object (they `tojson` it).
                        let args = serde_json::from_str::<serde_json::Value>(&c.arguments)
                            .unwrap_or_else(|_| serde_json::Value::String(c.arguments.clone()));
                        let mut call = IndexMap::new();
                        call.insert("id".to_string(), serde_json::json!(c.id));
                        call.insert("type".to_string(), serde_json::json!("function"));
                        call.insert(
                            "function".to_string(),
                            serde_json::json!({"name": c.name, "arguments": args}),
                        );
                        call
                    })
                    .collect();
                map.insert("tool_calls".into(), Either::Right(calls));
            }
            if let Some(id) = &m.tool_call_id {
                map.insert("tool_call_id".into(), Either::Left(id.clone()));
            }
            map
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::request::ChatMessage;

    fn tiny() -> LocalModel {
        let path = crate::test_fixture::tiny_path();
        tidepool_models::model_source::local_file(path).unwrap()
    }

    fn config() -> EngineConfig {
        EngineConfig {
            device: DevicePreference::Cpu,
            max_sequences: 2,
            prefix_cache_entries: 0,
            pooling: None,
        }
    }

    fn chat(text: &str, max_tokens: u32) -> GenerationRequest {
        let mut r = GenerationRequest::chat(vec![ChatMessage::new(Role::User, text)]);
        r.sampling.max_tokens = Some(max_tokens);
        r.sampling.temperature = Some(0.0);
        r
    }

    async fn finishes(engine: &dyn Engine, r: GenerationRequest) -> bool {
        let Ok(s) = engine.generate(r).await else {
            return false;
        };
        let events: Vec<_> = tokio::time::timeout(Duration::from_secs(120), s.collect::<Vec<_>>())
            .await
            .expect("the generation ends");
        matches!(events.last(), Some(GenerationEvent::Done { .. }))
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn dropped_streams_and_counts_never_kill_the_engine() {
        let e = MistralEngine::load(&tiny(), &config()).await.unwrap();
        for i in 0..40 {
            // Dropped at once, after the first event, or while counting tokens: mistral.rs
            // panicked on every one of these before its receivers were kept alive.
            let mut r = chat(&format!("story {i}"), 200);
            if i % 2 == 0 {
                r.prompt = Prompt::Text(format!("once upon a time {i}"));
            }
            match i % 3 {
                0 => {
                    let _ = tokio::time::timeout(Duration::from_micros(200), e.generate(r)).await;
                }
                1 => {
                    if let Ok(mut s) = e.generate(r).await {
                        let _ = s.next().await;
                    }
                }
                _ => {
                    let count = e.count_tokens(&r.prompt, &[]);
                    let _ = tokio::time::timeout(Duration::from_micros(50), count).await;
                }
            }
        }
        assert!(e.health().is_ok(), "{:?}", e.health());
        assert!(finishes(&e, chat("still there?", 8)).await);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_crashed_engine_reports_dead_and_refuses_work() {
        let e = MistralEngine::load(&tiny(), &config()).await.unwrap();
        assert!(e.health().is_ok());
        // The real mistral.rs panic (see `crash`); the pool replaces such a worker
        // (tidepool-sched's tests, and tests/tests/engine_health.rs on real engines).
        e.crash().await;
        assert!(matches!(e.health(), super::super::Health::Dead(_)));
        assert!(matches!(
            e.generate(chat("hello", 8)).await,
            Err(EngineError::Unavailable(_))
        ));
    }
}
