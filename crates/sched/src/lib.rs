//! The scheduler: what decides which request runs where, with no inference library in it.
//!
//! - [`queue`]: the one waiting line, bounded, with priority classes and deadlines.
//! - [`pool`]: workers (engine instances) and the slots requests lease from them; workers load,
//!   serve, drain, die and are replaced here.
//! - [`scheduler`]: the front of both: the live pool (swapped when the model changes), the
//!   request counts and latencies the control loop reads, and load shedding.
//! - [`capacity`]: what one worker serves, learned from the requests the pool runs.
//! - [`ledger`]: memory reservations per worker against a budget; [`memory`] reads the process.
//! - [`kv`]: how much context (KV cache) a new worker gets, from what recent requests needed.
//! - [`metrics`]: the request metrics, recorded once and exposed through the one registry.
//! - [`fake`]: workers that are fake engines, for the tests of this crate and those above it.

pub mod capacity;
pub mod fake;
pub mod kv;
pub mod ledger;
pub mod memory;
pub mod metrics;
pub mod pool;
pub mod queue;
pub mod scheduler;
