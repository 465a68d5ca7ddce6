//! The llama.cpp engine's thread: continuous batching over one `llama_context`.
//!
//! Each step it takes new requests into free sequence slots, builds one batch with the next
//! token of every decoding sequence plus prompt chunks of prefilling ones (up to `n_batch`
//! tokens), decodes it, and samples one token for every sequence whose logits came out. A
//! sequence whose client went away (its event receiver dropped) is removed at the start of the
//! next step and its KV cells are cleared at once, so its slot is free for the next request.
//!
//! A panic inside a step (a bug here or in llama.cpp's bindings) is caught: every running and
//! waiting request gets an error event, the engine marks itself dead, and the thread ends; the
//! pool then replaces the worker.

use std::collections::VecDeque;
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::time::Instant;

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::logit_bias::LlamaLogitBias;
use llama_cpp_2::token::LlamaToken;
use llguidance::Matcher;
use tokio::sync::mpsc::UnboundedSender;
use toktrie::{ApproximateTokEnv, TokEnv, TokRxInfo, TokTrie};

use super::tool_calls;
use super::Shared;
use crate::request::{FinishReason, GenerationEvent, Sampling, Usage};
use crate::text_out::{Step, TextOut};
use crate::OwnMemory;

/// One request, as the engine thread receives it.
pub(super) struct Job {
    pub tokens: Vec<LlamaToken>,
    pub sampling: Sampling,
    pub matcher: Option<Matcher>,
    /// Parse tool calls out of the output.
    pub parse_tools: bool,
    pub events: UnboundedSender<GenerationEvent>,
    pub started: Instant,
}

/// Says once whether the engine thread created its context, with what the context allocated
/// (the error says why not).
pub(super) type Ready = Receiver<Result<OwnMemory, String>>;

/// Starts the engine thread.
pub(super) fn spawn(
    shared: Arc<Shared>,
    backend: &'static LlamaBackend,
    params: LlamaContextParams,
    slots: usize,
    n_batch: u32,
) -> std::io::Result<(Sender<Msg>, Ready)> {
    let (jobs_tx, jobs_rx) = std::sync::mpsc::channel();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("llama.cpp".into())
        .spawn(move || {
            let thread = shared.thread.clone();
            let why = serve(&shared, backend, params, slots, n_batch, jobs_rx, ready_tx);
            // The weights go first (unloaded here if no other worker holds them), then the
            // engine learns that its thread has ended.
            drop(shared);
            *thread.died.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
            thread
                .alive
                .store(false, std::sync::atomic::Ordering::Release);
            thread.ended.notify_waiters();
        })?;
    Ok((jobs_tx, ready_rx))
}

/// Creates the context and serves on it until the engine ends; returns why it ended.
fn serve(
    shared: &Shared,
    backend: &'static LlamaBackend,
    params: LlamaContextParams,
    slots: usize,
    n_batch: u32,
    jobs: Receiver<Msg>,
    ready: Sender<Result<OwnMemory, String>>,
) -> String {
    let (ctx, memory) =
        super::memory::measure(|| shared.resident.model.new_context(backend, params));
    let ctx = match ctx {
        Ok(ctx) => ctx,
        Err(e) => {
            let why = format!("llama.cpp could not create a context: {e}");
            let _ = ready.send(Err(why.clone()));
            return why;
        }
    };
    let _ = ready.send(Ok(memory));
    Batcher {
        shared,
        ctx,
        batch: LlamaBatch::new(n_batch as usize, 1),
        n_batch: n_batch as usize,
        free: (0..slots as i32).rev().collect(),
        active: Vec::new(),
        waiting: VecDeque::new(),
    }
    .run(jobs)
}

struct Batcher<'a> {
    shared: &'a Shared,
    ctx: LlamaContext<'a>,
    batch: LlamaBatch<'a>,
    n_batch: usize,
    /// Sequence ids not in use.
    free: Vec<i32>,
    active: Vec<Seq>,
    /// Requests that arrived while every slot was busy (the pool's admission normally prevents
    /// this; an engine used directly queues here).
    waiting: VecDeque<Job>,
}

/// What the engine thread receives.
pub(super) enum Msg {
    Job(Box<Job>),
    /// Stop now: running and waiting requests get an error.
    Stop,
    /// Panic in the next step (unit tests of the panic path).
    #[cfg(test)]
    Panic,
}

impl Batcher<'_> {
    /// Serves until the engine is dropped or shut down, or a step panics; returns why it ended.
    fn run(mut self, jobs: Receiver<Msg>) -> String {
        loop {
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.turn(&jobs))) {
                Ok(None) => {}
                Ok(Some(why)) => return why,
                Err(panic) => {
                    let why = format!(
                        "the llama.cpp engine thread panicked: {}",
                        crate::panic_message(&panic)
                    );
                    tracing::error!("{why}");
                    for s in self.active.iter_mut() {
                        s.fail(why.clone());
                    }
                    for j in self.waiting.drain(..) {
                        super::fail(&j.events, why.clone());
                    }
                    // The context may be in any state: this engine serves no more.
                    self.active.clear();
                    return why;
                }
            }
        }
    }

    /// One turn of the loop: take new jobs, admit, step. `Some` when the engine should stop.
    fn turn(&mut self, jobs: &Receiver<Msg>) -> Option<String> {
        let mut open = true;
        let mut panic_now = false;
        if self.active.is_empty() && self.waiting.is_empty() {
            match jobs.recv() {
                Ok(m) => {
                    if let Some(why) = self.take(m, &mut panic_now) {
                        return Some(why);
                    }
                }
                Err(_) => return Some("the llama.cpp engine was dropped".into()),
            }
        }
        loop {
            match jobs.try_recv() {
                Ok(m) => {
                    if let Some(why) = self.take(m, &mut panic_now) {
                        return Some(why);
                    }
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        self.admit();
        self.drop_cancelled();
        if self.active.is_empty() {
            return (!open && self.waiting.is_empty())
                .then(|| "the llama.cpp engine was dropped".into());
        }
        if panic_now {
            panic!("a test asked this step to panic");
        }
        self.step();
        None
    }

    /// Takes one message; `Some` when it stops the engine.
    fn take(&mut self, m: Msg, panic_now: &mut bool) -> Option<String> {
        // Only a test asks for a panic.
        let _ = &panic_now;
        match m {
            Msg::Job(job) => {
                self.waiting.push_back(*job);
                None
            }
            Msg::Stop => {
                let why = "the llama.cpp engine was shut down".to_string();
                for s in self.active.iter_mut() {
                    s.fail(why.clone());
                }
                for j in self.waiting.drain(..) {
                    super::fail(&j.events, why.clone());
                }
                Some(why)
            }
            #[cfg(test)]
            Msg::Panic => {
                *panic_now = true;
                None
            }
        }
    }

    fn admit(&mut self) {
        self.waiting.retain(|j| !j.events.is_closed());
        while !self.free.is_empty() {
            let Some(job) = self.waiting.pop_front() else {
                break;
            };
            let Some(id) = self.free.pop() else {
                break;
            };
            let seq = Seq::new(id, job, self.shared);
            self.active.push(seq);
        }
    }

    fn drop_cancelled(&mut self) {
        let mut i = 0;
        while i < self.active.len() {
            if self.active[i].events.is_closed() {
                let seq = self.active.swap_remove(i);
                tracing::debug!(
                    seq = seq.id,
                    "llama.cpp: client went away; sequence cancelled"
                );
                self.release(seq.id);
            } else {
                i += 1;
            }
        }
    }

    /// Clears a sequence's KV cells and returns its slot.
    fn release(&mut self, id: i32) {
        if let Err(e) = self.ctx.clear_kv_cache_seq(Some(id as u32), None, None) {
            tracing::warn!(seq = id, "llama.cpp: clearing the KV cache failed: {e}");
        }
        self.free.push(id);
    }

    fn step(&mut self) {
        let limit = self.shared.context_tokens as i32;
        self.batch.clear();
        // Sequences that have run out of context end here, before they take a cell.
        let mut ended: Vec<(usize, FinishReason)> = Vec::new();
        for (i, s) in self.active.iter_mut().enumerate() {
            s.logits_at = None;
            if let Some(t) = s.next {
                if s.pos >= limit {
                    ended.push((i, FinishReason::Length));
                    continue;
                }
                if self.batch.add(t, s.pos, &[s.id], true).is_err() {
                    continue;
                }
                s.logits_at = Some(self.batch.n_tokens() - 1);
                s.pos += 1;
            }
        }
        let mut budget = self.n_batch.saturating_sub(self.batch.n_tokens() as usize);
        for s in self.active.iter_mut() {
            let left = s.prompt.len() - s.fed;
            if left == 0 || budget == 0 {
                continue;
            }
            let n = left.min(budget);
            for k in s.fed..s.fed + n {
                let last = k + 1 == s.prompt.len();
                if self
                    .batch
                    .add(s.prompt[k], k as i32, &[s.id], last)
                    .is_err()
                {
                    break;
                }
                if last {
                    s.logits_at = Some(self.batch.n_tokens() - 1);
                }
            }
            s.fed += n;
            s.pos = s.fed as i32;
            budget -= n;
        }
        if self.batch.n_tokens() > 0 {
            if let Err(e) = self.ctx.decode(&mut self.batch) {
                tracing::warn!("llama.cpp decode failed: {e}");
                for s in self.active.iter_mut() {
                    s.fail(format!("llama.cpp decode failed: {e}"));
                }
                let ids: Vec<i32> = self.active.drain(..).map(|s| s.id).collect();
                for id in ids {
                    self.release(id);
                }
                return;
            }
        }
        for (i, s) in self.active.iter_mut().enumerate() {
            if ended.iter().any(|(j, _)| *j == i) {
                continue;
            }
            if let Some(at) = s.logits_at {
                match s.sample(&self.ctx, at, &self.shared.resident.model) {
                    Ok(None) => {}
                    Ok(Some(reason)) => ended.push((i, reason)),
                    Err(e) => {
                        s.fail(e);
                        ended.push((i, FinishReason::Stop));
                    }
                }
            }
        }
        // Remove from the back so indices stay valid.
        ended.sort_by_key(|(i, _)| std::cmp::Reverse(*i));
        for (i, reason) in ended {
            let mut seq = self.active.swap_remove(i);
            seq.finish(reason);
            self.release(seq.id);
        }
    }
}

/// One running request.
struct Seq {
    id: i32,
    prompt: Vec<LlamaToken>,
    /// Prompt tokens already in a batch.
    fed: usize,
    /// Position of the next token.
    pos: i32,
    /// The token sampled last, to decode in the next step.
    next: Option<LlamaToken>,
    logits_at: Option<i32>,
    chain: LlamaSampler,
    matcher: Option<Matcher>,
    max_tokens: Option<u32>,
    text: TextOut,
    /// With tools: output held back while it may be a tool call (`None` once released).
    tool_text: Option<String>,
    generated: u32,
    events: UnboundedSender<GenerationEvent>,
    started: Instant,
    first_text: Option<Instant>,
    failed: bool,
}

impl Seq {
    fn new(id: i32, job: Job, shared: &Shared) -> Seq {
        let n_vocab = shared.resident.model.n_vocab();
        Seq {
            id,
            fed: 0,
            pos: 0,
            next: None,
            logits_at: None,
            chain: sampler_chain(&job.sampling, n_vocab),
            matcher: job.matcher,
            max_tokens: job.sampling.max_tokens,
            text: TextOut::new(&job.sampling.stop),
            tool_text: job.parse_tools.then(String::new),
            generated: 0,
            events: job.events,
            started: job.started,
            first_text: None,
            failed: false,
            prompt: job.tokens,
        }
    }

    /// Samples this sequence's next token from batch output `at`; `Some` when it has ended.
    fn sample(
        &mut self,
        ctx: &LlamaContext<'_>,
        at: i32,
        model: &LlamaModel,
    ) -> Result<Option<FinishReason>, String> {
        if self.max_tokens == Some(0) {
            return Ok(Some(FinishReason::Length));
        }
        let mut cand = ctx.token_data_array_ith(at);
        if let Some(m) = self.matcher.as_mut() {
            let mask = m
                .compute_mask_or_eos()
                .map_err(|e| format!("{}{e}", crate::grammar::FAILED))?;
            for d in cand.data.iter_mut() {
                if !mask.is_allowed(d.id().0 as u32) {
                    d.set_logit(f32::NEG_INFINITY);
                }
            }
        }
        cand.apply_sampler(&mut self.chain);
        let token = cand
            .selected_token()
            .ok_or_else(|| "llama.cpp's sampler selected no token".to_string())?;
        self.chain.accept(token);
        // The end-of-generation token counts as generated, as it does in mistral.rs's usage.
        self.generated += 1;
        if model.vocab().is_eog(token) {
            return Ok(Some(FinishReason::Stop));
        }
        let mut grammar_done = false;
        if let Some(m) = self.matcher.as_mut() {
            if m.consume_token(token.0 as u32).is_err() {
                return Err(format!(
                    "{}token {} does not fit it",
                    crate::grammar::FAILED,
                    token.0
                ));
            }
            grammar_done = m.is_stopped();
        }
        let piece = model.vocab().token_to_piece(token, false, None);
        match self.text.push(&piece) {
            Step::Text(t) => self.emit(t),
            Step::Stop(t) => {
                self.emit(t);
                return Ok(Some(self.text.stop_reason()));
            }
        }
        if grammar_done {
            return Ok(Some(FinishReason::Stop));
        }
        if self.max_tokens.is_some_and(|m| self.generated >= m) {
            return Ok(Some(FinishReason::Length));
        }
        self.next = Some(token);
        Ok(None)
    }

    fn send(&mut self, event: GenerationEvent) {
        if self.first_text.is_none() {
            self.first_text = Some(Instant::now());
        }
        let _ = self.events.send(event);
    }

    fn emit(&mut self, text: String) {
        if text.is_empty() {
            return;
        }
        match self.tool_text.as_mut() {
            Some(held) => {
                held.push_str(&text);
                if !tool_calls::may_be_call(held) {
                    let held = std::mem::take(held);
                    self.tool_text = None;
                    self.send(GenerationEvent::Text(held));
                }
            }
            None => self.send(GenerationEvent::Text(text)),
        }
    }

    fn fail(&mut self, why: String) {
        if !self.failed {
            self.failed = true;
            super::fail(&self.events, why);
        }
    }

    fn finish(&mut self, mut reason: FinishReason) {
        if self.failed {
            return;
        }
        let rest = self.text.finish();
        self.emit(rest);
        if let Some(held) = self.tool_text.take().filter(|t| !t.is_empty()) {
            match tool_calls::parse(&held) {
                Some(calls) => {
                    self.send(GenerationEvent::ToolCalls(calls));
                    reason = FinishReason::ToolCalls;
                }
                // A call the length limit cut off is no call and no answer: its markup is
                // never sent as text.
                None if reason == FinishReason::Length && tool_calls::is_call_start(&held) => {}
                None => self.send(GenerationEvent::Text(held)),
            }
        }
        let now = Instant::now();
        let usage = Usage {
            prompt_tokens: self.prompt.len() as u32,
            completion_tokens: self.generated,
            time_to_first_token: self.first_text.unwrap_or(now) - self.started,
            total_time: now - self.started,
        };
        let _ = self.events.send(GenerationEvent::Done {
            finish_reason: reason,
            usage,
        });
    }
}

/// The sampler chain of one request: logit bias, penalties, then greedy, or top-k, top-p,
/// temperature and a draw from an RNG seeded by the request's `seed` (so the same seed gives the
/// same output: each sequence has its own RNG, whatever else runs beside it).
fn sampler_chain(s: &Sampling, n_vocab: i32) -> LlamaSampler {
    let mut chain = Vec::new();
    if !s.logit_bias.is_empty() {
        let biases: Vec<LlamaLogitBias> = s
            .logit_bias
            .iter()
            .map(|(&id, &b)| {
                // -100 bans the token outright, as OpenAI documents (and the mistral.rs engine does).
                let b = if b <= -100.0 { f32::NEG_INFINITY } else { b };
                LlamaLogitBias::new(LlamaToken(id as i32), b)
            })
            .collect();
        chain.push(LlamaSampler::logit_bias(n_vocab, &biases));
    }
    let repeat = s.repetition_penalty.unwrap_or(1.0);
    let freq = s.frequency_penalty.unwrap_or(0.0);
    let present = s.presence_penalty.unwrap_or(0.0);
    if repeat != 1.0 || freq != 0.0 || present != 0.0 {
        chain.push(LlamaSampler::penalties(
            n_vocab,
            256,
            repeat.max(f32::MIN_POSITIVE),
            freq,
            present,
        ));
    }
    let temperature = s.temperature.unwrap_or(1.0);
    if temperature <= 0.0 {
        chain.push(LlamaSampler::greedy());
    } else {
        if let Some(k) = s.top_k.filter(|&k| k > 0) {
            chain.push(LlamaSampler::top_k(k.min(i32::MAX as u32) as i32));
        }
        if let Some(p) = s.top_p.filter(|&p| p > 0.0 && p < 1.0) {
            chain.push(LlamaSampler::top_p(p, 1));
        }
        chain.push(LlamaSampler::temp(temperature));
        let seed = match s.seed {
            Some(seed) => (seed ^ (seed >> 32)) as u32,
            None => rand::random::<u32>(),
        };
        chain.push(LlamaSampler::dist(seed));
    }
    LlamaSampler::chain_simple(chain)
}

/// llguidance's view of a llama.cpp vocabulary: every token's bytes (special tokens marked, as
/// upstream `llguidance.cpp` does), with every end-of-generation token registered as EOS so a
/// grammar can end on any of them.
pub(super) fn tok_env(model: &LlamaModel) -> TokEnv {
    let vocab = model.vocab();
    let n_vocab = model.n_vocab().max(0) as u32;
    let eos = match vocab.eot().0 {
        -1 => vocab.eos().0,
        eot => eot,
    };
    let eos = eos.max(0) as u32;
    let info = TokRxInfo::new(n_vocab, eos);
    let mut eog = vec![eos];
    let mut words = Vec::with_capacity(n_vocab as usize);
    for i in 0..n_vocab as i32 {
        let token = LlamaToken(i);
        if vocab.is_eog(token) && i as u32 != eos {
            eog.push(i as u32);
        }
        let bytes = vocab.token_to_piece(token, false, None);
        if bytes.is_empty() {
            let special = vocab.token_to_piece(token, true, None);
            if special.is_empty() {
                words.push(Vec::new());
            } else {
                let mut marked = Vec::with_capacity(special.len() + 1);
                marked.push(TokTrie::SPECIAL_TOKEN_MARKER);
                marked.extend(special);
                words.push(marked);
            }
        } else {
            words.push(bytes);
        }
    }
    let trie = TokTrie::from(&info, &words).with_eos_tokens(&eog);
    Arc::new(ApproximateTokEnv::new(trie))
}
