//! Backends: how a model is started, checked and released.
//!
//! - `process`: a supervised server process;
//! - `ollama`: a model inside a running Ollama, through its HTTP API;
//! - `external`: a model inside a client application, which follows instructions it receives
//!   over an attached stream and acknowledges them.

pub mod external;
pub mod leftovers;
pub mod logs;
pub mod ollama;
pub mod process;
