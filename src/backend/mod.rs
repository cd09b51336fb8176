//! Backends: how a model is started, checked and released. Only `process` exists so far.

pub mod process;
