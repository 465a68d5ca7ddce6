//! Between the API adapters (OpenAI, Ollama) and the scheduler.
//!
//! - [`service`]: the front door: which model is served, whether it is loaded, and starting a
//!   generation in a task of its own that owns its slot.
//! - [`gateway`]: what happens to a request on its way there, in order: [`profile`] (task
//!   profiles), [`answer_cache`], [`degrade`] (short answers under backlog), [`context_fit`]
//!   (prompts too long for the context).

pub mod answer_cache;
pub mod context_fit;
pub mod degrade;
pub mod gateway;
pub mod profile;
pub mod service;
