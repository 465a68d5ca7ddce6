//! The application: the one way Tidepool starts, whoever starts it. The `tidepool` binary, the
//! tray app and the integration tests all call [`launch`], which binds the listener, serves at
//! once (503 while the model loads), resolves and loads the model into a pool, starts the
//! control loop, and switches models at run time ([`serving`]). [`config`] is the configuration
//! schema they share.

pub mod config;
pub mod launch;
pub mod progress;
pub mod serving;

pub use config::Config;
pub use launch::{launch, Launch, Running};
pub use serving::FALLBACK_MODEL;
