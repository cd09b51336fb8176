//! Config check is the whole truth, as a property: configs are generated with every duration,
//! size, count and priority drawn over its whole range (zero, milliseconds, the largest accepted
//! value, and, in about half the configs, one value past its bound: 300 billion years, 2^64-1,
//! 99999999999999999999G). `vramgate config check` runs on each. Every config it accepts starts,
//! loads a model and streams a chat through the proxy without a panic, and the daemon still
//! answers after; every config it refuses, `serve` refuses too, with exit 2 and the same message
//! (never exit 101). A config without a value past its bound must be accepted: the bounds are
//! what docs/configuration.md documents, no tighter.
//!
//! Cases: 24, or `PROPTEST_CASES`. Each accepted one starts a daemon with millisecond timings.

mod common;

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use futures_util::StreamExt;
use proptest::prelude::*;
use serde_json::{Value, json};

use common::Daemon;

/// How long one request of a case may take. Every accepted config answers in milliseconds (the
/// fake model loads in 10 ms and streams five tokens 1 ms apart); a request that takes this long
/// is a daemon that stopped answering.
const REQUEST_DEADLINE: Duration = Duration::from_secs(20);

/// A value as written in TOML: a string (quoted) or a number (bare).
#[derive(Debug, Clone)]
enum Written {
    Text(&'static str),
    Number(&'static str),
}

impl Written {
    fn toml(&self) -> String {
        match self {
            Written::Text(text) => format!("{text:?}"),
            Written::Number(number) => number.to_string(),
        }
    }
}

fn pick(values: Vec<Written>) -> BoxedStrategy<Written> {
    proptest::sample::select(values).boxed()
}

/// Durations within the documented bound (at most a year), from zero to the bound itself.
fn any_duration() -> BoxedStrategy<Written> {
    use Written::*;
    pick(vec![
        Text("0"),
        Text("1ms"),
        Text("20ms"),
        Text("250ms"),
        Text("5s"),
        Text("10m"),
        Text("365d"),
        Text("1y"),
        Number("0"),
        Number("0.5"),
        Number("31557600"),
    ])
}

/// Durations that must be longer than zero (`ready_timeout`).
fn positive_duration() -> BoxedStrategy<Written> {
    use Written::*;
    pick(vec![Text("1ms"), Text("20ms"), Text("5s"), Text("1y"), Number("2"), Number("31557600")])
}

/// Durations past the bound, and ones that are not durations.
fn bad_duration() -> BoxedStrategy<Written> {
    use Written::*;
    pick(vec![
        Text("366d"),
        Text("1y 1s"),
        Text("300000000000y"),
        Text("99999999999999999999"),
        Number("18446744073709551615"),
        Number("9223372036854775807"),
        Number("31557601"),
        Number("1e300"),
        Text("-1s"),
    ])
}

/// Sizes past the bound (16 TiB), or negative.
fn bad_size() -> BoxedStrategy<Written> {
    use Written::*;
    pick(vec![
        Text("99999999999999999999G"),
        Text("17TiB"),
        Number("18446744073709551615"),
        Number("16777217"),
        Number("-1"),
    ])
}

/// Counts (`u32` keys): over their range, and past it.
fn any_count(min: &'static str) -> BoxedStrategy<Written> {
    use Written::*;
    pick(vec![Number(min), Number("1"), Number("2"), Number("512"), Number("4294967295")])
}

fn bad_count() -> BoxedStrategy<Written> {
    use Written::*;
    pick(vec![Number("-1"), Number("4294967296"), Number("18446744073709551615")])
}

/// Priorities over all of `i32`, and past it.
fn any_priority() -> BoxedStrategy<Written> {
    use Written::*;
    pick(vec![Number("-2147483648"), Number("-1"), Number("0"), Number("50"), Number("2147483647")])
}

fn bad_priority() -> BoxedStrategy<Written> {
    use Written::*;
    pick(vec![Number("2147483648"), Number("-9223372036854775808")])
}

/// One key of the generated config: its section, its name, a value within its bounds, and a value
/// past them.
struct Key {
    section: &'static str,
    name: &'static str,
    good: BoxedStrategy<Written>,
    bad: BoxedStrategy<Written>,
}

fn key(section: &'static str, name: &'static str, good: BoxedStrategy<Written>, bad: BoxedStrategy<Written>) -> Key {
    Key { section, name, good, bad }
}

/// Every key the property varies. Model sections are `models.m0` and `models.m1`; the fake
/// model's `vram` stays small enough to fit every device size generated, so that a refusal is
/// always about a bound.
fn keys() -> Vec<Key> {
    use Written::*;
    let mut keys = vec![
        key("gpu", "sample_interval", pick(vec![Text("10ms"), Text("50ms"), Text("1m")]), {
            pick(vec![Text("9ms"), Text("0"), Text("61s"), Text("300000000000y"), Number("18446744073709551615")])
        }),
        key("gpu", "reserve_mib", pick(vec![Number("0"), Number("1"), Text("512MiB")]), bad_size()),
        key("gpu", "change_threshold_mib", pick(vec![Number("0"), Number("100"), Text("16TiB")]), bad_size()),
        key("gpu.sim", "release_lag", pick(vec![Text("0"), Text("5ms"), Text("50ms")]), {
            pick(vec![Text("61s"), Text("300000000000y"), Number("18446744073709551615")])
        }),
        key("scheduler", "max_parallel_loads", any_count("1"), bad_count()),
        key("scheduler", "resident_cap", any_count("0"), bad_count()),
        key("scheduler", "max_queue", any_count("1"), bad_count()),
        key("scheduler", "max_waiters_per_model", any_count("1"), bad_count()),
        key("scheduler", "max_waiters", any_count("1"), bad_count()),
        key("scheduler", "queue_timeout", any_duration(), bad_duration()),
        key("scheduler", "max_wait_before_swap", any_duration(), bad_duration()),
        key("proxy", "max_body", pick(vec![Text("1MiB"), Number("256"), Text("16TiB")]), bad_size()),
        key("proxy", "first_byte_timeout", any_duration(), bad_duration()),
        key("proxy", "stall_timeout", any_duration(), bad_duration()),
        key("proxy", "client_timeout", any_duration(), bad_duration()),
        key("defaults", "priority", any_priority(), bad_priority()),
        key("defaults", "ready_timeout", positive_duration(), bad_duration()),
    ];
    for section in ["defaults", "models.m0", "models.m1"] {
        for name in ["ttl", "min_residency", "stop_timeout", "release_timeout"] {
            keys.push(key(section, name, any_duration(), bad_duration()));
        }
    }
    for section in ["models.m0", "models.m1"] {
        keys.push(key(section, "priority", any_priority(), bad_priority()));
        keys.push(key(section, "ready_timeout", positive_duration(), bad_duration()));
        keys.push(key(section, "vram", pick(vec![Number("1"), Number("100"), Text("200MiB")]), bad_size()));
    }
    keys
}

/// A generated config: each key set or left out, the device size, one or two models, and at most
/// one key given a value past its bound.
#[derive(Debug, Clone)]
struct Generated {
    /// `(section, key, value)`, in `keys()` order; `None` = not written.
    values: Vec<(&'static str, &'static str, Option<Written>)>,
    device: Written,
    two_models: bool,
    /// The key given a bad value, if any: `section.key`.
    broken: Option<String>,
}

fn generated() -> impl Strategy<Value = Generated> {
    let keys = keys();
    let count = keys.len();
    let per_key: Vec<_> = keys
        .into_iter()
        .map(|k| {
            let (section, name) = (k.section, k.name);
            (proptest::option::of(k.good), k.bad).prop_map(move |(good, bad)| (section, name, good, bad))
        })
        .collect();
    let device = pick(vec![Written::Number("1000"), Written::Text("1.5GiB"), Written::Text("16TiB")]);
    (per_key, device, any::<bool>(), proptest::option::of(0..count)).prop_map(
        |(per_key, device, two_models, broken_at)| {
            let mut broken = None;
            let values = per_key
                .into_iter()
                .enumerate()
                .map(|(index, (section, name, good, bad))| {
                    if Some(index) == broken_at && (two_models || !section.ends_with("m1")) {
                        broken = Some(format!("{section}.{name}"));
                        (section, name, Some(bad))
                    } else {
                        (section, name, good)
                    }
                })
                .collect();
            Generated { values, device, two_models, broken }
        },
    )
}

impl Generated {
    /// The config text, with the sim device in `sim` and the fake model's claims on it.
    fn render(&self, sim: &Path) -> String {
        let mut sections: Vec<(String, Vec<String>)> = vec![
            ("gpu".into(), vec!["probe = \"sim\"".into()]),
            (
                "gpu.sim".into(),
                vec![
                    format!("dir = {:?}", sim.display().to_string()),
                    format!("devices = [{{ name = \"Sim\", total_mib = {} }}]", self.device.toml()),
                ],
            ),
            ("scheduler".into(), vec![]),
            ("proxy".into(), vec![]),
            ("defaults".into(), vec![]),
        ];
        let models = if self.two_models { vec!["m0", "m1"] } else { vec!["m0"] };
        for model in &models {
            sections.push((
                format!("models.{model}"),
                vec![
                    "backend = \"process\"".into(),
                    format!(
                        "cmd = \"{} --port ${{PORT}} --sim-dir {} --vram 1 --name {model} --load-delay 10ms --token-delay 1ms\"",
                        common::fake(),
                        sim.display()
                    ),
                ],
            ));
        }
        for (section, name, value) in &self.values {
            let Some(value) = value else { continue };
            if let Some((_, lines)) = sections.iter_mut().find(|(s, _)| s == section) {
                lines.push(format!("{name} = {}", value.toml()));
            }
        }
        sections.iter().map(|(section, lines)| format!("[{section}]\n{}\n", lines.join("\n"))).collect()
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A generated config written as `vramgate.toml` in a temp dir whose sim directory it names.
struct ConfigFile {
    dir: tempfile::TempDir,
    path: std::path::PathBuf,
    shown: String,
}

fn write(config: &Generated) -> ConfigFile {
    let dir = tempfile::tempdir().expect("tempdir");
    let shown = config.render(&dir.path().join("sim"));
    let path = dir.path().join("vramgate.toml");
    std::fs::write(&path, &shown).expect("write config");
    ConfigFile { dir, path, shown }
}

fn check(file: &ConfigFile) -> Output {
    common::output(common::vramgate().args(["config", "check"]).arg(&file.path))
}

/// `serve` on a config `config check` refused: it must refuse it the same way, with exit 2.
fn serve_refuses(file: &ConfigFile, refusal: &str) -> Result<(), TestCaseError> {
    let output = common::output_within(
        common::vramgate()
            .args(["serve", "--listen", "127.0.0.1:0", "--config"])
            .arg(&file.path)
            .env("XDG_STATE_HOME", file.dir.path().join("state")),
        REQUEST_DEADLINE,
    );
    let stderr = text(&output.stderr);
    prop_assert_eq!(output.status.code(), Some(2), "serve on a refused config; stderr: {}", stderr);
    prop_assert!(stderr.contains(refusal), "serve said\n{}\nwhere config check said\n{}", stderr, refusal);
    Ok(())
}

async fn post(daemon: &Daemon, path: &str, body: Value) -> Result<(u16, String), String> {
    let client = reqwest::Client::builder().timeout(REQUEST_DEADLINE).build().map_err(|e| e.to_string())?;
    let response = client.post(format!("{}{path}", daemon.url)).json(&body).send().await.map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    Ok((status, response.text().await.unwrap_or_default()))
}

/// A load, a streamed chat read to its end (or to the error that ends it: a 1 ms
/// `first_byte_timeout` or `ready_timeout` makes failing answers, which are fine), and a second
/// load; then the daemon must still run, answer, and have logged no panic.
async fn serves_without_panicking(config: &Generated) -> Result<(), TestCaseError> {
    let daemon = Daemon::start(|sim| config.render(sim));
    let outcome = async {
        let (status, body) = post(&daemon, "/vramgate/models/m0/load", Value::Null).await?;
        let loaded = format!("load: {status} {body}");
        let client = reqwest::Client::builder().timeout(REQUEST_DEADLINE).build().map_err(|e| e.to_string())?;
        let chat = json!({"model": "m0", "stream": true, "messages": [{"role": "user", "content": "hi"}]});
        let response = client
            .post(format!("{}/v1/chat/completions", daemon.url))
            .json(&chat)
            .send()
            .await
            .map_err(|e| format!("{loaded}; chat: {e}"))?;
        let chat_status = response.status().as_u16();
        let mut stream = response.bytes_stream();
        let mut streamed = String::new();
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(bytes) => streamed.push_str(&String::from_utf8_lossy(&bytes)),
                // A broken-off stream (stall or client timeout) is an answer too; a panic shows
                // in the log, checked below.
                Err(e) => {
                    streamed.push_str(&format!("[stream ended: {e}]"));
                    break;
                }
            }
        }
        let (again, body) = post(&daemon, "/vramgate/models/m0/load", Value::Null).await?;
        if body.contains("shutting down") {
            return Err(format!("{loaded}; the second load says {again} {body}"));
        }
        let health = reqwest::get(format!("{}/vramgate/health", daemon.url)).await.map_err(|e| e.to_string())?;
        if !health.status().is_success() {
            return Err(format!("health: {}", health.status()));
        }
        Ok::<String, String>(format!("{loaded}; chat: {chat_status} {streamed}"))
    }
    .await;
    let mut daemon = daemon;
    let exited = daemon.child.try_wait().expect("try_wait");
    let log = daemon.log();
    prop_assert!(exited.is_none(), "the daemon exited ({exited:?}); outcome {outcome:?}; log:\n{log}");
    prop_assert!(!log.contains("panicked"), "a panic; outcome {outcome:?}; log:\n{log}");
    prop_assert!(outcome.is_ok(), "{outcome:?}; log:\n{log}");
    Ok(())
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(24)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        // Each case may start a daemon: shrink a little, not for minutes.
        max_shrink_iters: 64,
        // A failure prints its minimal config; nothing is written into the source tree.
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn every_config_check_accepts_serves_a_load_and_a_stream_and_every_one_it_refuses_serve_refuses(
        config in generated()
    ) {
        let file = write(&config);
        let shown = &file.shown;
        let output = check(&file);
        let stderr = text(&output.stderr);
        match output.status.code() {
            Some(0) => {
                // Served first: a value past its bound that check let through shows as the panic
                // it causes, not only as a missed refusal.
                let runtime = tokio::runtime::Runtime::new().expect("runtime");
                runtime.block_on(serves_without_panicking(&config))?;
                prop_assert!(
                    config.broken.is_none(),
                    "{:?} past its bound was accepted:\n{}", config.broken, shown
                );
            }
            code => {
                let Some(key) = &config.broken else {
                    return Err(TestCaseError::fail(format!(
                        "a config within the bounds was refused ({code:?}):\n{shown}\n{stderr}"
                    )));
                };
                prop_assert_eq!(code, Some(2), "{}:\n{}\n{}", key, shown, stderr);
                prop_assert!(
                    stderr.contains(&format!("key `{key}`")) && stderr.contains(", line "),
                    "the refusal must name {} and its line:\n{}\n{}", key, shown, stderr
                );
                serve_refuses(&file, stderr.trim())?;
            }
        }
    }
}
