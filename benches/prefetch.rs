//! Prefetch during a swap, measured: a request for a llama-server model whose memory is held by
//! a victim that takes 2 s to release. Without prefetch, llama-server starts once the victim is
//! gone and then reads its ~340 MiB GGUF from disk; with prefetch, vramgate reads the file while
//! the victim is released. Before every run the file is dropped from the page cache
//! (`POSIX_FADV_DONTNEED`). Both daemons run in the same bench, alternately; the baseline is the
//! run without prefetch, and the report is the time to first byte of each and their ratio, beside
//! the time a cold read of the file takes alone.
//!
//! Needs a llama-server (`LLAMA_SERVER`, default the CI cache
//! `~/.cache/vramgate-ci/llama-server-0.3.36/llama-server`, built by `.ci/llama-server.sh`) and a
//! Python with the `gguf` package (`GGUF_PYTHON`, default `python3`) to write the model with
//! `clients/compat/make_gguf.py --bench`.
//!
//! Run: `cargo bench --bench prefetch` (add `-- --rounds 5` for more).

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures_util::StreamExt;

/// The victim's release time.
const VICTIM_STOP: &str = "2s";

fn main() {
    let rounds: usize = common::arg("--rounds", 3);
    let home = std::env::var("HOME").unwrap_or_default();
    let llama = std::env::var("LLAMA_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(&home).join(".cache/vramgate-ci/llama-server-0.3.36/llama-server"));
    if !llama.is_file() {
        eprintln!(
            "prefetch bench: no llama-server at {} (set LLAMA_SERVER, or run .ci/llama-server.sh)",
            llama.display()
        );
        std::process::exit(1);
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let gguf = dir.path().join("bench.gguf");
    let python = std::env::var("GGUF_PYTHON").unwrap_or_else(|_| "python3".into());
    let made = std::process::Command::new(&python)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/compat/make_gguf.py"))
        .arg("--bench")
        .arg(&gguf)
        .status()
        .expect("run make_gguf.py");
    assert!(made.success(), "make_gguf.py failed (does {python} have the gguf package? set GGUF_PYTHON)");
    let size_mib = std::fs::metadata(&gguf).expect("the model file").len() >> 20;

    let daemon = |prefetch: bool| {
        let name = if prefetch { "on" } else { "off" };
        let root = dir.path().join(name);
        std::fs::create_dir_all(&root).expect("dir");
        let config = root.join("vramgate.toml");
        std::fs::write(
            &config,
            format!(
                "[server]\nstate_dir = \"{root}/state\"\n[gpu]\nprobe = \"sim\"\nsample_interval = \"50ms\"\n\
                 [gpu.sim]\ndir = \"{root}/sim\"\ndevices = [{{ name = \"Sim 16G\", total_mib = 16384 }}]\n\
                 [scheduler]\nprefetch = {prefetch}\n\
                 [models.victim]\nbackend = \"process\"\nvram = 12000\npriority = 10\n\
                 cmd = [\"{fake}\", \"--port\", \"${{PORT}}\", \"--sim-dir\", \"{root}/sim\", \"--vram\", \"12000\", \"--name\", \"victim\", \"--stop-delay\", \"{VICTIM_STOP}\", \"--load-delay\", \"10ms\"]\n\
                 [models.llm]\nbackend = \"process\"\nvram = 8000\npriority = 90\n\
                 cmd = [\"{llama}\", \"--port\", \"${{PORT}}\", \"--host\", \"127.0.0.1\", \"-m\", \"{gguf}\", \"-c\", \"2048\", \"-t\", \"2\", \"-np\", \"1\"]\n",
                root = root.display(),
                fake = env!("CARGO_BIN_EXE_vramgate-fake-model"),
                llama = llama.display(),
                gguf = gguf.display(),
            ),
        )
        .expect("config");
        common::Daemon::start(env!("CARGO_BIN_EXE_vramgate"), &config)
    };
    let on = daemon(true);
    let off = daemon(false);

    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        let client = reqwest::Client::new();
        let cold_read = {
            drop_from_cache(&gguf);
            let start = Instant::now();
            let bytes = std::fs::read(&gguf).expect("read the model");
            assert!(!bytes.is_empty());
            start.elapsed()
        };
        let mut times: [Vec<Duration>; 2] = [Vec::new(), Vec::new()];
        for _ in 0..rounds {
            for (slot, daemon) in [(0, &off), (1, &on)] {
                times[slot].push(swap_to_first_byte(&client, &daemon.url, &gguf).await);
            }
        }
        let median = |mut v: Vec<Duration>| {
            v.sort();
            v[v.len() / 2]
        };
        let [without, with] = times;
        let (without, with) = (median(without), median(with));
        println!("a request for llm ({size_mib} MiB GGUF, dropped from the page cache) while a victim takes {VICTIM_STOP} to release; median of {rounds}");
        println!("  a cold read of the file alone               {:>8.0} ms", ms(cold_read));
        println!("  baseline: without prefetch, to first byte   {:>8.0} ms", ms(without));
        println!(
            "  with prefetch, to first byte                {:>8.0} ms = {:.3}x the baseline ({:+.0} ms)",
            ms(with),
            with.as_secs_f64() / without.as_secs_f64(),
            ms(with) - ms(without)
        );
    });
}

/// Loads the victim, drops the model file from the page cache, then times a streamed request for
/// llm (which evicts the victim and starts llama-server) to its first byte; unloads llm after.
async fn swap_to_first_byte(client: &reqwest::Client, url: &str, gguf: &Path) -> Duration {
    let load = client.post(format!("{url}/vramgate/models/victim/load")).send().await.expect("load victim");
    assert!(load.status().is_success(), "victim: {}", load.status());
    drop_from_cache(gguf);
    let body = serde_json::json!({
        "model": "llm", "stream": true, "max_tokens": 1,
        "messages": [{"role": "user", "content": "hello"}]
    });
    let start = Instant::now();
    let response = client.post(format!("{url}/v1/chat/completions")).json(&body).send().await.expect("request");
    if !response.status().is_success() {
        let status = response.status();
        panic!("llm: {status}: {}", response.text().await.unwrap_or_default());
    }
    let mut stream = response.bytes_stream();
    let first = stream.next().await.expect("a first chunk").expect("body");
    let elapsed = start.elapsed();
    assert!(!first.is_empty());
    while stream.next().await.is_some() {}
    let unload = client.post(format!("{url}/vramgate/models/llm/unload")).send().await.expect("unload llm");
    assert!(unload.status().is_success());
    elapsed
}

/// Drops the file's pages from the page cache (clean pages of a file nothing maps).
fn drop_from_cache(path: &Path) {
    let file = std::fs::File::open(path).expect("open the model");
    nix::fcntl::posix_fadvise(&file, 0, 0, nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED).expect("fadvise");
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
