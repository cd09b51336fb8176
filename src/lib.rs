//! vramgate: the one daemon on a machine that owns the GPU-memory question for local AI.
//!
//! See `ARCHITECTURE.md` for the code map and the invariants.

pub mod api;
pub mod arbiter;
pub mod backend;
pub mod catalog;
pub mod cli;
pub mod client;
pub mod config;
pub mod daemon;
pub mod demo;
pub mod events;
pub mod gguf;
pub mod gpu;
pub mod history;
pub mod keeper;
pub mod metrics;
pub mod monitor;
pub mod notify;
pub mod plan;
pub mod policy;
pub mod status;
pub mod store;
pub mod units;
