//! What happens to a request between an API adapter (OpenAI, Ollama) and the [`Service`], in
//! order: its task profile is applied ([`crate::profile`]); the answer cache is consulted
//! ([`crate::answer_cache`]); on a miss, a standard request under backlog is degraded
//! ([`crate::degrade`]), a prompt too long for the context budget is rejected or truncated
//! ([`crate::context_fit`]), and the fresh generation is recorded into the cache. A combined
//! profile runs its label and reply generations on one pinned worker slot. Both adapters call
//! [`Gateway::submit`] and turn its [`Report`] into headers and `usage` fields, so every API
//! behaves the same.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use std::time::{Duration, Instant};

use parking_lot::Mutex;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::answer_cache::{AnswerCache, CacheConfig, CacheKey, CacheStats, CachedAnswer};
use crate::context_fit::{self, ContextConfig, Layout, Overflow, TailSearch, Truncation};
use crate::degrade::DegradedConfig;
use crate::profile::{self, Plan, ProfileError, Profiles};
use crate::service::{Service, SubmitError};
use tidepool_engine::request::{FinishReason, GenerationEvent, GenerationRequest, Prompt, Usage};
use tidepool_engine::EngineError;
use tidepool_engine::GenerationStream;
use tidepool_sched::queue::Class;

/// The most tokens an answer may have when the request names no limit and the context has room:
/// bounded so that a client that forgets `max_tokens` cannot hold a slot for the whole context.
pub const DEFAULT_MAX_TOKENS: u32 = 1024;

/// With no `max_tokens`, the least room an answer needs before the prompt counts as too long.
const MIN_OPEN_ANSWER: u64 = 16;

/// The gateway's part of the configuration file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GatewayConfig {
    pub cache: CacheConfig,
    pub context: ContextConfig,
    pub degraded: DegradedConfig,
    /// Configured task profiles (the built-in ones are always there unless replaced).
    pub profiles: Profiles,
    /// Messages one chat request may carry (`server.max_messages`).
    pub max_messages: usize,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            cache: CacheConfig::default(),
            context: ContextConfig::default(),
            degraded: DegradedConfig::default(),
            profiles: Profiles::default(),
            max_messages: tidepool_engine::request::DEFAULT_MAX_MESSAGES,
        }
    }
}

/// Why a request was not started.
#[derive(Debug, Error, Clone)]
pub enum GatewayError {
    #[error(transparent)]
    Submit(#[from] SubmitError),
    /// Prompt + `max_tokens` exceed the context budget (HTTP 400).
    #[error("{0}")]
    ContextTooLong(String),
    /// An unknown profile (404) or one that cannot serve this request (400).
    #[error(transparent)]
    Profile(#[from] ProfileError),
    /// The request exceeds a bound (too many messages, stop strings…): HTTP 400 naming `param`.
    #[error("{message}")]
    Invalid { param: String, message: String },
}

/// Whether an answer came from the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStatus {
    Hit,
    Miss,
}

impl CacheStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            CacheStatus::Hit => "hit",
            CacheStatus::Miss => "miss",
        }
    }
}

/// What the gateway did to a request, for the adapter to report.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    /// `None` when the cache is off.
    pub cache: Option<CacheStatus>,
    /// Set when messages were dropped to fit the context budget.
    pub truncation: Option<Truncation>,
    /// The request got the short answer of degraded mode.
    pub degraded: bool,
    /// The task profile that served the request.
    pub profile: Option<String>,
    /// A combined profile's label (its answer also starts with it).
    pub label: Option<String>,
    /// A combined profile's label generation: its tokens and timings (the rest of the answer's
    /// usage is the reply's).
    pub label_usage: Option<Usage>,
}

/// A started answer: its events and what was done to get them.
pub struct Answer {
    pub stream: GenerationStream,
    pub report: Report,
}

/// One request as an adapter hands it over.
#[derive(Debug, Clone)]
pub struct Submission {
    pub request: GenerationRequest,
    /// The class the client asked for; `None` lets the profile decide (else standard).
    pub class: Option<Class>,
    /// The task profile, by name.
    pub profile: Option<String>,
}

impl Submission {
    /// A request with no profile, in the class the client asked for (or standard).
    pub fn new(request: GenerationRequest, class: Option<Class>) -> Submission {
        Submission {
            request,
            class,
            profile: None,
        }
    }
}

/// The gateway. Share it as `Arc<Gateway>`.
pub struct Gateway {
    service: Arc<Service>,
    config: GatewayConfig,
    /// Built-in and configured profiles.
    profiles: Profiles,
    cache: Arc<Mutex<AnswerCache>>,
    degraded_total: AtomicU64,
}

impl Gateway {
    pub fn new(service: Arc<Service>, config: GatewayConfig) -> Arc<Gateway> {
        Arc::new(Gateway {
            service,
            cache: Arc::new(Mutex::new(AnswerCache::from_config(&config.cache))),
            profiles: profile::resolve(&config.profiles),
            config,
            degraded_total: AtomicU64::new(0),
        })
    }

    pub fn service(&self) -> &Arc<Service> {
        &self.service
    }

    pub fn config(&self) -> GatewayConfig {
        self.config.clone()
    }

    pub fn cache_stats(&self) -> CacheStats {
        self.cache.lock().stats()
    }

    /// The profiles requests may name.
    pub fn profiles(&self) -> &Profiles {
        &self.profiles
    }

    /// Checks `request` against the bounds every request is held to before any work is done
    /// on it (messages, stop strings, tools…).
    fn check_bounds(&self, request: &GenerationRequest) -> Result<(), GatewayError> {
        request
            .check_bounds(self.config.max_messages)
            .map_err(|(param, message)| GatewayError::Invalid { param, message })
    }

    /// Tokens `request`'s prompt occupies once rendered with its tools, held to the same bounds
    /// as [`Gateway::submit`] before it is tokenized.
    pub async fn count_tokens(&self, request: &GenerationRequest) -> Result<u32, GatewayError> {
        self.check_bounds(request)?;
        Ok(self
            .service
            .count_tokens(&request.prompt, &request.tools)
            .await?)
    }

    /// Starts (or replays) one answer.
    pub async fn submit(&self, sub: Submission) -> Result<Answer, GatewayError> {
        let cfg = &self.config;
        self.check_bounds(&sub.request)?;
        let mut report = Report::default();
        let (mut request, class, label_profile) = match &sub.profile {
            None => (sub.request, sub.class.unwrap_or(Class::Standard), None),
            Some(name) => {
                report.profile = Some(name.clone());
                match profile::plan(&self.profiles, name, sub.request)? {
                    Plan::Single { request, class } => (
                        request,
                        sub.class.or(class).unwrap_or(Class::Standard),
                        None,
                    ),
                    Plan::Combined {
                        label_profile,
                        reply,
                        class,
                    } => (
                        reply,
                        sub.class.or(class).unwrap_or(Class::Standard),
                        Some(label_profile),
                    ),
                }
            }
        };
        if cfg.cache.enabled {
            report.cache = Some(CacheStatus::Miss);
        }
        // Combined answers are not cached (their label travels in a header).
        let cacheable = cfg.cache.enabled
            && label_profile.is_none()
            && (cfg.cache.sampled || request.sampling.is_deterministic());
        let key = cacheable.then(|| {
            CacheKey::of(
                &self.service.model_name(),
                sub.profile.as_deref().unwrap_or(""),
                &request,
            )
        });
        if let Some(key) = &key {
            let found = self.cache.lock().get(key, Instant::now());
            if let Some(answer) = found {
                report.cache = Some(CacheStatus::Hit);
                report.truncation = answer.truncation;
                return Ok(Answer {
                    stream: replay(answer),
                    report,
                });
            }
        }
        if cfg.degraded.applies(class, self.backlog()) {
            request = cfg.degraded.degrade(request);
            report.degraded = true;
            self.degraded_total.fetch_add(1, Ordering::Relaxed);
        }
        let (request, truncation) = self.fit(request, &cfg.context).await?;
        report.truncation = truncation;
        if let Some(label_profile) = label_profile {
            return self.combined(&label_profile, request, class, report).await;
        }
        let stream = self.service.submit_as(request, class).await?;
        // A degraded answer is not the answer to the request: never stored.
        let key = key.filter(|_| !report.degraded);
        let stream = match key {
            Some(key) => record(stream, key, truncation, self.cache.clone()),
            None => stream,
        };
        Ok(Answer { stream, report })
    }

    /// A combined profile: the label, then the reply, on one worker slot. The label's prompt is
    /// the reply's conversation plus the label question, so when the reply starts, the engine's
    /// prefix cache already holds the conversation's KV cache and computes only the few tokens
    /// after it.
    async fn combined(
        &self,
        label_profile: &str,
        reply: GenerationRequest,
        class: Class,
        mut report: Report,
    ) -> Result<Answer, GatewayError> {
        let profile = profile::find(&self.profiles, label_profile)?;
        let label_request = profile::label_request(label_profile, profile, &reply)?;
        let need =
            context_fit::tokens_needed(&label_request).max(context_fit::tokens_needed(&reply));
        let pinned = self.service.pin(class, need).await?;
        let mut label_stream = self.service.submit_pinned(&pinned, label_request).await?;
        let mut label = String::new();
        let mut label_usage = None;
        while let Some(ev) = label_stream.next().await {
            match ev {
                GenerationEvent::Text(t) => label.push_str(&t),
                GenerationEvent::Done { usage, .. } => label_usage = Some(usage),
                GenerationEvent::ToolCalls(_) => {}
                GenerationEvent::Error(e) => {
                    return Err(SubmitError::Engine(EngineError::Internal(format!(
                        "the label generation failed: {e}"
                    )))
                    .into())
                }
            }
        }
        drop(label_stream);
        let label_usage = label_usage.unwrap_or_default();
        let label = label.trim().to_string();
        // The reply starts when the client has the label: the answer streams out at once.
        let service = self.service.clone();
        let reply_stream = futures::stream::once(async move {
            match service.submit_pinned(&pinned, reply).await {
                Ok(s) => s,
                Err(e) => {
                    let failed: GenerationStream =
                        Box::pin(futures::stream::iter([GenerationEvent::Error(
                            e.to_string(),
                        )]));
                    failed
                }
            }
        })
        .flatten();
        report.label = Some(label.clone());
        report.label_usage = Some(label_usage);
        let head = futures::stream::iter(vec![
            GenerationEvent::Text(label),
            GenerationEvent::Text("\n\n".into()),
        ]);
        let body = reply_stream.map(move |ev| match ev {
            GenerationEvent::Done {
                finish_reason,
                usage,
            } => GenerationEvent::Done {
                finish_reason,
                usage: Usage {
                    prompt_tokens: usage.prompt_tokens + label_usage.prompt_tokens,
                    completion_tokens: usage.completion_tokens + label_usage.completion_tokens,
                    time_to_first_token: label_usage.time_to_first_token,
                    total_time: label_usage.total_time + usage.total_time,
                },
            },
            other => other,
        });
        Ok(Answer {
            stream: Box::pin(head.chain(body)),
            report,
        })
    }

    /// Requests waiting for a slot.
    pub fn backlog(&self) -> usize {
        self.service.scheduler().backlog()
    }

    /// Applies the long-input policy: the request as is when it fits the context budget, else
    /// rejected or truncated. A request with no `max_tokens` gets [`DEFAULT_MAX_TOKENS`], or what
    /// the prompt leaves of the budget when that is less. Tokens are counted only when the prompt's byte size says it might
    /// not fit.
    async fn fit(
        &self,
        mut request: GenerationRequest,
        cfg: &ContextConfig,
    ) -> Result<(GenerationRequest, Option<Truncation>), GatewayError> {
        let default_max = request.sampling.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS);
        let engine_max = self.service.context_limit();
        let budget = match (cfg.budget_tokens.map(u64::from), engine_max) {
            (Some(b), Some(m)) => b.min(m),
            (Some(b), None) => b,
            (None, Some(m)) => m,
            (None, None) => {
                request.sampling.max_tokens = Some(default_max);
                return Ok((request, None));
            }
        };
        let explicit = request.sampling.max_tokens;
        let max_tokens = match explicit {
            Some(m) if u64::from(m) >= budget => {
                return Err(GatewayError::ContextTooLong(format!(
                    "max_tokens ({m}) alone reaches the context budget of {budget} tokens; ask for fewer."
                )))
            }
            Some(m) => u64::from(m),
            // Room kept for an answer whose length the client left open.
            None => u64::from(DEFAULT_MAX_TOKENS).min(budget / 2),
        };
        request.sampling.max_tokens = Some(max_tokens as u32);
        let available = budget - max_tokens;
        let bound = context_fit::prompt_upper_bound(&request);
        if bound <= available {
            return Ok((request, None));
        }
        let total = match self.count(&request.prompt, &request).await? {
            Some(n) => n,
            // No engine to count with: the engine checks the length itself when it runs.
            None => return Ok((request, None)),
        };
        if total <= available {
            return Ok((request, None));
        }
        if explicit.is_none() && total + MIN_OPEN_ANSWER <= budget {
            // The client named no limit: the answer may use what the prompt leaves.
            request.sampling.max_tokens = Some((budget - total) as u32);
            return Ok((request, None));
        }
        let too_long = |why: &str| {
            GatewayError::ContextTooLong(format!(
                "The prompt ({total} tokens) plus max_tokens ({max_tokens}) is {} tokens, above the context budget of {budget} tokens. Shorten the input or lower max_tokens{why}.",
                total + max_tokens
            ))
        };
        let messages = match (&request.prompt, cfg.on_overflow) {
            (_, Overflow::Reject) => {
                return Err(too_long(
                    " (or set [context] on_overflow = \"truncate\" on the server)",
                ))
            }
            (Prompt::Text(_), Overflow::Truncate) => {
                return Err(too_long(" (text prompts are never truncated)"))
            }
            (Prompt::Chat(m), Overflow::Truncate) => m.clone(),
        };
        let layout = Layout::new(messages, cfg.keep_head);
        for with_head in [true, false] {
            let mut search = TailSearch::new(layout.max_tail(with_head));
            while let Some(tail) = search.next_tail() {
                let (kept, _) = layout.select(with_head, tail);
                let n = self
                    .count(&Prompt::Chat(kept), &request)
                    .await?
                    .unwrap_or(u64::MAX);
                search.report(n <= available);
            }
            if let Some(tail) = search.best() {
                let (kept, dropped) = layout.select(with_head, tail);
                tracing::info!(
                    dropped,
                    original_tokens = total,
                    budget,
                    "truncated a long conversation to fit the context"
                );
                request.prompt = Prompt::Chat(kept);
                return Ok((
                    request,
                    Some(Truncation {
                        dropped_messages: dropped,
                        original_prompt_tokens: total as u32,
                    }),
                ));
            }
        }
        Err(too_long(
            " (even the system prompt and the last message alone do not fit)",
        ))
    }

    /// Tokens of `prompt` with the request's tools, `None` when no engine can count. Counting
    /// renders the chat template, which takes time on a long conversation: it may take as long
    /// as a request may wait, no longer.
    async fn count(
        &self,
        prompt: &Prompt,
        request: &GenerationRequest,
    ) -> Result<Option<u64>, GatewayError> {
        let deadline = self.service.queue_deadline();
        match tokio::time::timeout(deadline, self.service.count_tokens(prompt, &request.tools))
            .await
        {
            Ok(Ok(n)) => Ok(Some(u64::from(n))),
            Ok(Err(SubmitError::Engine(EngineError::Invalid(m)))) => Err(GatewayError::Submit(
                SubmitError::Engine(EngineError::Invalid(m)),
            )),
            Ok(Err(e)) => {
                tracing::debug!("cannot count tokens: {e}");
                Ok(None)
            }
            Err(_) => Err(GatewayError::Submit(SubmitError::DeadlineExceeded(
                format!(
                    "Reading the prompt took longer than the {:.0} s a request may wait.",
                    deadline.as_secs_f64()
                ),
            ))),
        }
    }

    /// Registers the gateway's metrics (answer cache, degraded answers) in the registry.
    pub fn register(self: &Arc<Self>, registry: &mut Registry) {
        registry.register_collector(Box::new(GatewayCollector(self.clone())));
    }
}

/// The gateway's counters, read at each scrape.
struct GatewayCollector(Arc<Gateway>);

impl std::fmt::Debug for GatewayCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GatewayCollector")
    }
}

impl Collector for GatewayCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = self.0.cache_stats();
        let mut lookups = encoder.encode_descriptor(
            "tidepool_answer_cache_lookups",
            "Answer cache lookups by result.",
            None,
            MetricType::Counter,
        )?;
        for (result, n) in [("hit", s.hits), ("miss", s.misses)] {
            ConstCounter::new(n).encode(lookups.encode_family(&[("result", result)])?)?;
        }
        tidepool_sched::metrics::encode_gauge(
            &mut encoder,
            "tidepool_answer_cache_hit_ratio",
            "Hits over lookups since start.",
            s.hit_rate(),
        )?;
        for (name, help, v) in [
            (
                "tidepool_answer_cache_entries",
                "Answers stored.",
                s.entries as i64,
            ),
            (
                "tidepool_answer_cache_bytes",
                "Bytes the stored answers account for.",
                s.bytes as i64,
            ),
        ] {
            ConstGauge::new(v).encode(encoder.encode_descriptor(
                name,
                help,
                None,
                MetricType::Gauge,
            )?)?;
        }
        for (name, help, v) in [
            (
                "tidepool_answer_cache_evictions",
                "Answers evicted to stay within the byte bound.",
                s.evictions,
            ),
            (
                "tidepool_degraded",
                "Requests given the short answer of degraded mode.",
                self.0.degraded_total.load(Ordering::Relaxed),
            ),
        ] {
            ConstCounter::new(v).encode(encoder.encode_descriptor(
                name,
                help,
                None,
                MetricType::Counter,
            )?)?;
        }
        Ok(())
    }
}

/// A stored answer as a stream: the same text chunks, then how it ended (no compute, so no time).
fn replay(a: CachedAnswer) -> GenerationStream {
    let mut events: Vec<GenerationEvent> =
        a.chunks.into_iter().map(GenerationEvent::Text).collect();
    if !a.tool_calls.is_empty() {
        events.push(GenerationEvent::ToolCalls(a.tool_calls));
    }
    events.push(GenerationEvent::Done {
        finish_reason: a.finish_reason,
        usage: Usage {
            time_to_first_token: Duration::ZERO,
            total_time: Duration::ZERO,
            ..a.usage
        },
    });
    Box::pin(futures::stream::iter(events))
}

/// Passes a generation through, storing it under `key` once it finishes (not when it fails or
/// is cancelled).
fn record(
    stream: GenerationStream,
    key: CacheKey,
    truncation: Option<Truncation>,
    cache: Arc<Mutex<AnswerCache>>,
) -> GenerationStream {
    let mut chunks = Vec::new();
    let mut tool_calls = Vec::new();
    Box::pin(stream.map(move |ev| {
        match &ev {
            GenerationEvent::Text(t) => chunks.push(t.clone()),
            GenerationEvent::ToolCalls(c) => tool_calls.extend(c.iter().cloned()),
            GenerationEvent::Done {
                finish_reason:
                    finish_reason
                    @ (FinishReason::Stop | FinishReason::Length | FinishReason::ToolCalls),
                usage,
            } => {
                let answer = CachedAnswer {
                    chunks: std::mem::take(&mut chunks),
                    tool_calls: std::mem::take(&mut tool_calls),
                    finish_reason: *finish_reason,
                    usage: *usage,
                    truncation,
                };
                cache.lock().insert(key, answer, Instant::now());
            }
            GenerationEvent::Done { .. } | GenerationEvent::Error(_) => {}
        }
        ev
    }))
}
