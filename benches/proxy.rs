//! The proxy against the baselines the issue names, side by side in one run:
//!
//! - warm requests: `wrk` straight at a fake model server, through nginx (`proxy_pass` with
//!   upstream keepalive, 1 worker), and through vramgate, at 1, 8 and 64 connections;
//! - streaming: the delay vramgate adds to each streamed chunk, against the same stream direct;
//! - cold start and swap: time to first byte when the model must start, against the server's own
//!   spawn-to-healthy time; a full swap A→B against A's release plus B's start measured alone.
//!
//! Run: `cargo bench --bench proxy` (needs `wrk` and `nginx` on PATH for the warm table:
//! `apt-get install wrk nginx-light`; without them those rows are skipped). `-- --seconds N` sets
//! each wrk run's length (default 3), `-- --repeat N` the runs per cell (default 3, median kept).

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use serde_json::{Value, json};

const FAKE: &str = env!("CARGO_BIN_EXE_vramgate-fake-model");
const VRAMGATE: &str = env!("CARGO_BIN_EXE_vramgate");

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// nginx's master must stop its workers itself (SIGTERM); a SIGKILLed master orphans them.
struct Stopped(Child);

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ =
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.0.id() as i32), nix::sys::signal::Signal::SIGTERM);
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

fn main() {
    let seconds: u64 = common::arg("--seconds", 3);
    let repeat: usize = common::arg("--repeat", 3);
    let dir = tempfile::tempdir().expect("tempdir");
    let sim = dir.path().join("sim");
    let fake = |name: &str, extra: &str| {
        format!(
            "[models.{name}]\nbackend = \"process\"\ncmd = \"{FAKE} --port ${{PORT}} --sim-dir {} --quiet --name {name} {extra}\"\n",
            sim.display()
        )
    };
    let config = format!(
        "[server]\nstate_dir = \"{}\"\n[gpu]\nprobe = \"sim\"\nreserve_mib = 0\nsample_interval = \"500ms\"\n[gpu.sim]\ndir = \"{}\"\ndevices = [{{ name = \"Sim 10G\", total_mib = 10000 }}]\n{}vram = 100\n{}vram = 100\n{}vram = 6000\n{}vram = 6000\n",
        dir.path().join("state").display(),
        sim.display(),
        fake("warm", "--token-delay 0ms --load-delay 10ms --vram 100"),
        fake("stream", "--token-delay 10ms --load-delay 10ms --vram 100"),
        fake("swap_a", "--token-delay 0ms --load-delay 500ms --vram 6000"),
        fake("swap_b", "--token-delay 0ms --load-delay 500ms --vram 6000"),
    );
    let config_path = dir.path().join("bench.toml");
    std::fs::write(&config_path, config).expect("config");
    let daemon = common::Daemon::start(VRAMGATE, &config_path);
    let gate = daemon.url.clone();

    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
    let client = reqwest::Client::new();
    let load = |model: &str| {
        let (client, url) = (client.clone(), format!("{gate}/vramgate/models/{model}/load"));
        runtime.block_on(async move {
            let status: Value = client.post(url).send().await.expect("load").json().await.expect("status");
            status["upstream"].as_str().expect("upstream").to_string()
        })
    };
    let warm_upstream = load("warm");
    let stream_upstream = load("stream");

    println!(
        "== warm requests (wrk, {seconds} s per run, median of {repeat} interleaved runs per cell; POST /v1/chat/completions, non-streamed)"
    );
    warm_table(dir.path(), &gate, &warm_upstream, seconds, repeat);

    println!(
        "\n== streaming: transit time of each chunk, server to client (5 chunks 10 ms apart, 100 requests each way)"
    );
    runtime.block_on(streaming(&client, &gate, &stream_upstream));

    println!("\n== cold start and swap (fake server: 500 ms load, polled by vramgate every 25 ms)");
    runtime.block_on(cold(&client, &gate, &sim));
}

fn warm_table(dir: &Path, gate: &str, upstream: &str, seconds: u64, repeat: usize) {
    let (Ok(_), Ok(_)) = (Command::new("wrk").arg("--version").output(), Command::new("nginx").arg("-v").output())
    else {
        println!("skipped: needs wrk and nginx (apt-get install wrk nginx-light)");
        return;
    };
    let nginx_port = free_port();
    let upstream_addr = upstream.trim_start_matches("http://");
    let conf = format!(
        "worker_processes 1;\npid {0}/nginx.pid;\nerror_log {0}/nginx.err;\nevents {{ worker_connections 4096; }}\nhttp {{\n  access_log off;\n  client_body_temp_path {0};\n  proxy_temp_path {0};\n  upstream up {{ server {upstream_addr}; keepalive 128; }}\n  server {{\n    listen 127.0.0.1:{nginx_port};\n    location / {{ proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_buffering off; }}\n  }}\n}}\n",
        dir.display()
    );
    let conf_path = dir.join("nginx.conf");
    std::fs::write(&conf_path, conf).expect("nginx.conf");
    let nginx = Command::new("nginx")
        .args(["-c"])
        .arg(&conf_path)
        .args(["-p"])
        .arg(dir)
        .args(["-g", "daemon off;"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start nginx");
    let _nginx = Stopped(nginx);
    let script = dir.join("post.lua");
    std::fs::write(
        &script,
        "wrk.method = \"POST\"\nwrk.body = '{\"model\":\"warm\",\"messages\":[]}'\nwrk.headers[\"Content-Type\"] = \"application/json\"\n",
    )
    .expect("lua");
    // Wait for nginx to listen.
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::net::TcpStream::connect(("127.0.0.1", nginx_port)).is_err() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let targets = [
        ("direct", upstream.to_string()),
        ("nginx", format!("http://127.0.0.1:{nginx_port}")),
        ("vramgate", gate.to_string()),
    ];
    println!(
        "{:<6} {:<9} {:>10} {:>9} {:>9} {:>12} {:>16}",
        "conns", "path", "req/s", "p50 us", "p99 us", "x direct", "added p50 us"
    );
    for connections in [1u32, 8, 64] {
        // Interleaved (direct, nginx, vramgate, direct, ...) so that a noisy moment hits all
        // three; each cell is the run with the median throughput.
        let mut runs: Vec<Vec<(f64, f64, f64)>> = vec![Vec::new(); targets.len()];
        for _ in 0..repeat.max(1) {
            for (index, (_, base)) in targets.iter().enumerate() {
                runs[index].push(wrk(&script, &format!("{base}/v1/chat/completions"), connections, seconds));
            }
        }
        let rows: Vec<(&str, (f64, f64, f64))> = targets
            .iter()
            .zip(runs)
            .map(|((name, _), mut results)| {
                results.sort_by(|a, b| a.0.total_cmp(&b.0));
                (*name, results[results.len() / 2])
            })
            .collect();
        let direct = rows[0].1;
        for (name, (rate, p50, p99)) in &rows {
            println!(
                "{connections:<6} {name:<9} {rate:>10.0} {p50:>9.0} {p99:>9.0} {:>11.2}x {:>16.0}",
                rate / direct.0,
                p50 - direct.1
            );
        }
        let (nginx, gate) = (rows[1].1, rows[2].1);
        println!(
            "       vramgate / nginx throughput = {:.2}x; vramgate added p50 - nginx added p50 = {:+.0} us",
            gate.0 / nginx.0,
            (gate.1 - direct.1) - (nginx.1 - direct.1)
        );
    }
}

/// (requests/s, p50 µs, p99 µs) from one wrk run.
fn wrk(script: &Path, url: &str, connections: u32, seconds: u64) -> (f64, f64, f64) {
    let output = Command::new("wrk")
        .args(["-t1", &format!("-c{connections}"), &format!("-d{seconds}s"), "--latency", "-s"])
        .arg(script)
        .arg(url)
        .output()
        .expect("run wrk");
    let text = String::from_utf8_lossy(&output.stdout);
    let rate =
        text.lines().find_map(|l| l.strip_prefix("Requests/sec:")).and_then(|v| v.trim().parse().ok()).unwrap_or(0.0);
    let percentile = |p: &str| {
        text.lines().map(str::trim).find_map(|l| l.strip_prefix(p)).map(|v| micros(v.trim())).unwrap_or(f64::NAN)
    };
    if text.contains("Non-2xx") {
        eprintln!("warning: non-2xx answers from {url}:\n{text}");
    }
    (rate, percentile("50%"), percentile("99%"))
}

/// wrk's latency ("66.00us", "1.20ms", "2.00s") in microseconds.
fn micros(text: &str) -> f64 {
    let split = text.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number.parse().unwrap_or(f64::NAN);
    match unit {
        "us" => value,
        "ms" => value * 1e3,
        "s" => value * 1e6,
        _ => f64::NAN,
    }
}

/// Transit time of each streamed chunk in microseconds: from the fake server stamping it
/// (`sent_us`, wall clock) to the client reading it. Server, proxy and client share one machine and
/// one clock, so this is the delay each token sees, without the request's own start-up in it.
async fn chunk_transits(client: &reqwest::Client, url: &str) -> Vec<f64> {
    let response =
        client.post(url).json(&json!({"model": "stream", "stream": true})).send().await.expect("stream request");
    let mut transits = Vec::new();
    let mut pending = String::new();
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let arrived = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_micros() as f64;
        pending.push_str(&String::from_utf8_lossy(&chunk.expect("chunk")));
        // Only complete events: an event split across reads is finished by the next read.
        while let Some(end) = pending.find("\n\n") {
            let event: String = pending.drain(..end + 2).collect();
            let sent = event
                .strip_prefix("data: ")
                .and_then(|data| serde_json::from_str::<Value>(data.trim()).ok())
                .and_then(|value| value["sent_us"].as_u64());
            if let Some(sent) = sent {
                transits.push(arrived - sent as f64);
            }
        }
    }
    transits
}

fn percentile(values: &mut [f64], pct: usize) -> f64 {
    values.sort_by(f64::total_cmp);
    values[(values.len() * pct / 100).min(values.len() - 1)]
}

async fn streaming(client: &reqwest::Client, gate: &str, upstream: &str) {
    let runs = 100;
    let mut direct = Vec::new();
    let mut proxied = Vec::new();
    // Interleaved, so both paths see the same machine load.
    for _ in 0..runs {
        direct.extend(chunk_transits(client, &format!("{upstream}/v1/chat/completions")).await);
        proxied.extend(chunk_transits(client, &format!("{gate}/v1/chat/completions")).await);
    }
    println!("{:<10} {:>8} {:>10} {:>10} {:>10}", "path", "chunks", "p50 us", "p90 us", "p99 us");
    let mut rows = Vec::new();
    for (name, transits) in [("direct", &mut direct), ("vramgate", &mut proxied)] {
        let row = [50, 90, 99].map(|pct| percentile(transits, pct));
        println!("{name:<10} {:>8} {:>10.0} {:>10.0} {:>10.0}", transits.len(), row[0], row[1], row[2]);
        rows.push(row);
    }
    println!(
        "added by vramgate: p50 {:.0} us, p90 {:.0} us, p99 {:.0} us",
        rows[1][0] - rows[0][0],
        rows[1][1] - rows[0][1],
        rows[1][2] - rows[0][2]
    );
}

/// Spawns the fake as vramgate would and polls its health every millisecond: the server's own
/// spawn-to-healthy time, the baseline for a cold start.
async fn spawn_to_healthy(client: &reqwest::Client, sim: &Path) -> Duration {
    let port = free_port();
    let start = Instant::now();
    let child = Command::new(FAKE)
        .args(["--port", &port.to_string(), "--sim-dir"])
        .arg(sim.join("direct"))
        .args(["--quiet", "--load-delay", "500ms", "--vram", "6000"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn fake");
    let _child = Killed(child);
    let url = format!("http://127.0.0.1:{port}/health");
    loop {
        if let Ok(response) = client.get(&url).send().await
            && response.status() == 200
        {
            return start.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

async fn first_byte(client: &reqwest::Client, gate: &str, model: &str) -> Duration {
    let start = Instant::now();
    let response = client
        .post(format!("{gate}/v1/chat/completions"))
        .json(&json!({"model": model}))
        .send()
        .await
        .expect("request");
    let elapsed = start.elapsed();
    let _ = response.bytes().await;
    elapsed
}

async fn unload(client: &reqwest::Client, gate: &str, model: &str) -> Duration {
    let start = Instant::now();
    client.post(format!("{gate}/vramgate/models/{model}/unload")).send().await.expect("unload");
    start.elapsed()
}

async fn cold(client: &reqwest::Client, gate: &str, sim: &Path) {
    let rounds = 5;
    let mut baseline = Vec::new();
    let mut cold_start = Vec::new();
    let mut release = Vec::new();
    let mut swap = Vec::new();
    for _ in 0..rounds {
        baseline.push(spawn_to_healthy(client, sim).await);
        unload(client, gate, "swap_a").await;
        unload(client, gate, "swap_b").await;
        cold_start.push(first_byte(client, gate, "swap_a").await);
        release.push(unload(client, gate, "swap_a").await);
        // A ready and idle, then B, which does not fit beside it: release A, start B.
        first_byte(client, gate, "swap_a").await;
        swap.push(first_byte(client, gate, "swap_b").await);
    }
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let (b, c, r, s) = (median(&mut baseline), median(&mut cold_start), median(&mut release), median(&mut swap));
    println!("median of {rounds} rounds:");
    println!("  server alone, spawn to healthy (1 ms polling)   {:>8.1} ms", ms(b));
    println!(
        "  cold start through vramgate, to first byte     {:>8.1} ms = {:.3}x the server alone",
        ms(c),
        ms(c) / ms(b)
    );
    println!("  release of A alone (unload, memory back)       {:>8.1} ms", ms(r));
    println!(
        "  swap A -> B through vramgate, to first byte    {:>8.1} ms = {:.3}x (A's release + B's start alone = {:.1} ms)",
        ms(s),
        ms(s) / (ms(r) + ms(b)),
        ms(r) + ms(b)
    );
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
