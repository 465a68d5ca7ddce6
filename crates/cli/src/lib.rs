//! The parts of the `tidepool` command that other front ends reuse: starting the server in-process
//! (the tray app runs the same server) and progress reporting.

pub mod progress;
pub mod serve;
