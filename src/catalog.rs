//! What vramgate knows about each configured model beyond its state, for the surfaces that
//! describe models (`/api/show`, `/api/tags`, `/api/ps`, `/v1/models`): the weights file its
//! command names, what that file's GGUF header says, when it was modified, and its capabilities.
//!
//! Built once at start-up (file reads, on the blocking pool): a header that cannot be read is a
//! warning, and the model is described with what the config says.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Value, json};

use crate::config::{BackendSpec, ModelSpec, ProcessSpec};
use crate::gguf::estimate::{self, Estimate};
use crate::gguf::{self, GgufInfo};

/// The facts about every configured model, by id.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    models: HashMap<String, ModelFacts>,
    /// When facts are asked for a model the catalog does not hold (none: every configured model
    /// is in it), or for an `[aliases]` name without candidates.
    fallback_modified: Option<SystemTime>,
}

/// What is known about one model.
#[derive(Debug, Clone)]
pub struct ModelFacts {
    /// The weights file the command names (`-m`/`--model`, or an argument ending in `.gguf`).
    pub weights: Option<PathBuf>,
    /// `gguf` when the weights file is a GGUF file (by its name or its header), else empty.
    pub format: &'static str,
    /// The weights file's GGUF header, when it could be read.
    pub header: Option<GgufInfo>,
    /// The weights file's modification time; else the config file's; else the daemon's start.
    pub modified: SystemTime,
    /// Ollama's capability names: `completion` for every model that serves requests, plus
    /// `embedding` (`--embedding`/`--embeddings` in the command), `vision` (`--mmproj`) and
    /// `tools` (`--jinja`); none for an external model.
    pub capabilities: Vec<&'static str>,
    /// For a model inside Ollama: Ollama's address and its name of the model.
    pub ollama: Option<(String, String)>,
    /// The context size the command asks for (llama-server's `-c`/`--ctx-size`), when it names
    /// a number: what the model runs with, as far as the config tells.
    pub ctx_size: Option<u64>,
    /// For a process model with a readable GGUF header: its footprint estimate for the command's
    /// flags (see [`gguf::estimate`]), or why there is none.
    pub estimate: Option<Result<Estimate, String>>,
    /// The request sent once it is ready (`warmup`): what `vramgate plan --measure` sends to
    /// find its peak.
    pub warmup: Option<crate::config::Warmup>,
}

impl Catalog {
    /// Reads what the specs' commands name (blocking: run it on the blocking pool).
    /// `config_file` is where the config came from; `started` is the daemon's start.
    pub fn build(specs: &[ModelSpec], config_file: Option<&Path>, started: SystemTime) -> Catalog {
        let config_modified = config_file.and_then(modified_time);
        let fallback = config_modified.unwrap_or(started);
        let models = specs.iter().map(|spec| (spec.id.clone(), ModelFacts::of(spec, fallback))).collect();
        Catalog { models, fallback_modified: Some(fallback) }
    }

    /// Each model's footprint estimate, term by term, for the models that have one.
    pub fn estimate_terms(&self) -> HashMap<String, Estimate> {
        self.models
            .iter()
            .filter_map(|(id, facts)| Some((id.clone(), facts.estimate.as_ref()?.as_ref().ok()?.clone())))
            .collect()
    }

    /// Each process model's weights file that exists, for the prefetch during a swap.
    pub fn weights_files(&self) -> HashMap<String, PathBuf> {
        self.models
            .iter()
            .filter_map(|(id, facts)| Some((id.clone(), facts.weights.clone().filter(|path| path.is_file())?)))
            .collect()
    }

    /// Each model's warmup request, for the models that have one.
    pub fn warmups(&self) -> HashMap<String, crate::config::Warmup> {
        self.models.iter().filter_map(|(id, facts)| Some((id.clone(), facts.warmup.clone()?))).collect()
    }

    /// Each model's footprint estimate in MiB, for the models that have one.
    pub fn estimates(&self) -> HashMap<String, u64> {
        self.models
            .iter()
            .filter_map(|(id, facts)| Some((id.clone(), facts.estimate.as_ref()?.as_ref().ok()?.total_mib())))
            .collect()
    }

    /// The facts about model `id`.
    pub fn get(&self, id: &str) -> Option<&ModelFacts> {
        self.models.get(id)
    }

    /// When model `id` was last modified, as Unix seconds (`/v1/models`' `created`).
    pub fn created(&self, id: &str) -> i64 {
        let modified = self.get(id).map(|facts| facts.modified).or(self.fallback_modified);
        modified.map_or(0, |at| DateTime::<Utc>::from(at).timestamp())
    }
}

impl ModelFacts {
    fn of(spec: &ModelSpec, fallback: SystemTime) -> ModelFacts {
        let mut facts = ModelFacts {
            weights: None,
            format: "",
            header: None,
            modified: fallback,
            capabilities: Vec::new(),
            ollama: None,
            ctx_size: None,
            estimate: None,
            warmup: spec.warmup.clone(),
        };
        match &spec.backend {
            BackendSpec::Process(process) => {
                facts.capabilities = capabilities(&process.argv);
                facts.ctx_size = ctx_size(&process.argv);
                facts.weights = weights_path(process);
                if let Some(weights) = &facts.weights {
                    if weights.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
                        facts.format = "gguf";
                    }
                    if let Some(modified) = modified_time(weights) {
                        facts.modified = modified;
                    }
                    if weights.is_file() {
                        match gguf::read_file(weights) {
                            Ok(header) => {
                                facts.format = "gguf";
                                let args = process.argv.get(1..).unwrap_or_default();
                                let estimated = estimate::launch_from_args(args).and_then(|mut launch| {
                                    launch.extra_bytes = extra_model_bytes(process);
                                    estimate::estimate(&header, &launch)
                                });
                                if let Err(e) = &estimated {
                                    tracing::warn!(model = %spec.id, "no footprint estimate from {}: {e}", weights.display());
                                }
                                facts.estimate = Some(estimated);
                                facts.header = Some(header);
                            }
                            Err(e) if facts.format == "gguf" => {
                                tracing::warn!(model = %spec.id, "cannot read the GGUF header: {e}");
                            }
                            // Not a GGUF file, and not named as one: nothing to tell.
                            Err(_) => {}
                        }
                    }
                }
            }
            BackendSpec::Ollama(ollama) => {
                facts.capabilities = vec!["completion"];
                facts.ollama = Some((ollama.url.clone(), ollama.model.clone()));
            }
            BackendSpec::External(_) => {}
        }
        facts
    }

    /// `modified_at`, as Ollama writes it.
    pub fn modified_at(&self) -> String {
        DateTime::<Utc>::from(self.modified).to_rfc3339_opts(SecondsFormat::AutoSi, true)
    }

    /// The architecture, from the header.
    pub fn family(&self) -> &str {
        self.header.as_ref().and_then(|h| h.architecture.as_deref()).unwrap_or("")
    }

    /// Ollama's `details` object.
    pub fn details(&self) -> Value {
        let family = self.family();
        let header = self.header.as_ref();
        json!({
            "parent_model": "",
            "format": self.format,
            "family": family,
            "families": if family.is_empty() { Value::Null } else { json!([family]) },
            "parameter_size": header.and_then(|h| h.parameter_count).map(gguf::parameter_size).unwrap_or_default(),
            "quantization_level": header
                .and_then(|h| h.file_type)
                .and_then(gguf::quantization_name)
                .unwrap_or_default(),
        })
    }

    /// Ollama's `model_info`: the header's keys, spelled as in the file.
    pub fn model_info(&self) -> Value {
        let mut info = serde_json::Map::new();
        let Some(header) = &self.header else { return Value::Object(info) };
        if let Some(architecture) = &header.architecture {
            info.insert("general.architecture".into(), json!(architecture));
            if let Some(context) = header.context_length {
                info.insert(format!("{architecture}.context_length"), json!(context));
            }
        }
        if let Some(name) = &header.name {
            info.insert("general.name".into(), json!(name));
        }
        if let Some(file_type) = header.file_type {
            info.insert("general.file_type".into(), json!(file_type));
        }
        if let Some(count) = header.parameter_count {
            info.insert("general.parameter_count".into(), json!(count));
        }
        Value::Object(info)
    }
}

fn modified_time(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// What the other model files a command loads take on disk: a `--mmproj`/`-mm` projector and a
/// `-md`/`--model-draft` draft model (relative to the model's `cwd`, as the process sees them).
/// A file that cannot be looked at counts nothing.
fn extra_model_bytes(process: &ProcessSpec) -> u64 {
    let args = process.argv.get(1..).unwrap_or_default();
    let mut total: u64 = 0;
    for (index, arg) in args.iter().enumerate() {
        let named = match arg.as_str() {
            "--mmproj" | "-mm" | "-md" | "--model-draft" => args.get(index + 1).map(String::as_str),
            _ => arg.strip_prefix("--mmproj=").or_else(|| arg.strip_prefix("--model-draft=")),
        };
        let Some(named) = named.filter(|n| !n.contains("${") && !n.is_empty()) else { continue };
        if let Ok(metadata) = std::fs::metadata(as_the_process_sees(process, named)) {
            total = total.saturating_add(metadata.len());
        }
    }
    total
}

/// The weights file a command names: the argument after `-m`/`--model` (or `--model=PATH`), else
/// the first argument ending in `.gguf`. A relative path is relative to the model's `cwd` (the
/// process runs there), else to the daemon's working directory. An argument with a `${...}`
/// expansion is not a file that can be looked at before the start.
fn weights_path(process: &ProcessSpec) -> Option<PathBuf> {
    if let Some(weights) = &process.weights {
        return Some(weights.clone());
    }
    let args = process.argv.get(1..).unwrap_or_default();
    let flagged = args.iter().enumerate().find_map(|(index, arg)| match arg.as_str() {
        "-m" | "--model" => args.get(index + 1).map(String::as_str),
        _ => arg.strip_prefix("--model="),
    });
    let named = flagged.or_else(|| {
        args.iter().map(String::as_str).find(|arg| {
            Path::new(arg).extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) && !arg.starts_with('-')
        })
    })?;
    if named.contains("${") || named.is_empty() {
        return None;
    }
    Some(as_the_process_sees(process, named))
}

/// A path argument of the command as the process sees it: a relative one is relative to the
/// model's `cwd` (the process runs there), else to the daemon's working directory.
fn as_the_process_sees(process: &ProcessSpec, named: &str) -> PathBuf {
    let path = PathBuf::from(named);
    match (&process.cwd, path.is_relative()) {
        (Some(cwd), true) => cwd.join(path),
        _ => path,
    }
}

/// The context size a command asks for: the number after `-c`/`--ctx-size` (or in
/// `--ctx-size=N`), the last one if given twice (as llama-server reads its flags). Anything else
/// (a `${...}` expansion, no number) tells nothing, and so does 0 (llama-server's "the model's
/// own context length").
fn ctx_size(argv: &[String]) -> Option<u64> {
    let args = argv.get(1..).unwrap_or_default();
    let mut named = args.iter().enumerate().filter_map(|(index, arg)| match arg.as_str() {
        "-c" | "--ctx-size" => args.get(index + 1).map(String::as_str),
        _ => arg.strip_prefix("--ctx-size="),
    });
    named.next_back()?.parse().ok().filter(|&n: &u64| n > 0)
}

/// Ollama's capability names a command's flags tell (llama-server's spelling).
fn capabilities(argv: &[String]) -> Vec<&'static str> {
    let has = |flags: &[&str]| {
        argv.iter().any(|arg| {
            let flag = arg.split_once('=').map_or(arg.as_str(), |(flag, _)| flag);
            flags.contains(&flag)
        })
    };
    let mut capabilities = vec!["completion"];
    if has(&["--embedding", "--embeddings"]) {
        capabilities.push("embedding");
    }
    if has(&["--mmproj", "-mm", "--mmproj-url", "-mmu"]) {
        capabilities.push("vision");
    }
    if has(&["--jinja"]) {
        capabilities.push("tools");
    }
    capabilities
}

#[cfg(test)]
mod tests {
    use super::*;

    fn process(argv: &[&str], cwd: Option<&str>) -> ProcessSpec {
        ProcessSpec {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            health: None,
            env: Default::default(),
            cwd: cwd.map(PathBuf::from),
            cpu_argv: None,
            weights: None,
        }
    }

    #[test]
    fn finds_the_weights_file_a_command_names() {
        let path = |argv: &[&str], cwd| weights_path(&process(argv, cwd));
        assert_eq!(path(&["llama-server", "-m", "a.bin"], None), Some(PathBuf::from("a.bin")));
        assert_eq!(path(&["llama-server", "--model=/w/b.gguf"], None), Some(PathBuf::from("/w/b.gguf")));
        assert_eq!(path(&["srv", "--port", "1", "x.GGUF"], Some("/m")), Some(PathBuf::from("/m/x.GGUF")));
        assert_eq!(path(&["srv", "-m", "${MODEL_ID}.gguf"], None), None);
        assert_eq!(path(&["srv", "--port", "${PORT}"], None), None);
        assert_eq!(path(&["srv", "-m"], None), None);
    }

    #[test]
    fn reads_the_context_size_a_command_asks_for() {
        let of = |argv: &[&str]| ctx_size(&argv.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(of(&["llama-server", "-m", "a.gguf", "-c", "8192"]), Some(8192));
        assert_eq!(of(&["llama-server", "--ctx-size=4096"]), Some(4096));
        assert_eq!(of(&["llama-server", "--ctx-size", "1024", "-c", "2048"]), Some(2048));
        assert_eq!(of(&["llama-server", "-c", "${CTX}"]), None);
        assert_eq!(of(&["llama-server", "-c"]), None);
        assert_eq!(of(&["llama-server", "--port", "-c"]), None);
        assert_eq!(of(&["llama-server"]), None);
        assert_eq!(of(&["llama-server", "-c", "0"]), None, "0 is the model's own length");
    }

    #[test]
    fn capabilities_follow_the_commands_flags() {
        let of = |argv: &[&str]| capabilities(&argv.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(of(&["srv"]), ["completion"]);
        assert_eq!(
            of(&["srv", "--embeddings", "--mmproj=p.gguf", "--jinja"]),
            ["completion", "embedding", "vision", "tools"]
        );
    }
}
