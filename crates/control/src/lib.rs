//! The control loop: from what the machine and the requests say to how many workers run.
//!
//! - [`signals`]: the machine (CPU load, memory, temperatures, battery, GPUs), each source a
//!   trait with a real implementation and a fake one for tests.
//! - [`power`]: power modes and the governor that turns battery and heat into limits.
//! - [`policy`]: the pure scaling policy (signals in, a worker count and its reason out).
//! - [`queueing`]: how long requests would wait at a pool size (Erlang C), for the policy.
//! - [`cpu_limit`]: the cores inference threads may run on.
//! - [`settle`]: a value that changes only once a new one has held (the saturation point).
//! - [`autoscale`]: the loop that reads the signals, asks the policy, and moves the pool.

pub mod autoscale;
pub mod cpu_limit;
pub mod policy;
pub mod power;
pub mod queueing;
pub mod settle;
pub mod signals;
