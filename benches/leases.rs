//! Lease grant + release round trips per second over loopback HTTP against the real daemon
//! (release build, sim device). Baseline in the same run: two `GET /vramgate/health` round trips
//! per iteration (the same number of HTTP exchanges, with no arbiter work).
//!
//! Run: `cargo bench --bench leases` (add `-- --iterations 5000` for more).

mod common;

use std::time::{Duration, Instant};

fn main() {
    let iterations: usize = common::arg("--iterations", 2000);
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("bench.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nstate_dir = \"{0}/state\"\n[gpu]\nprobe = \"sim\"\n[gpu.sim]\ndir = \"{0}/sim\"\ndevices = [{{ name = \"Sim 24G\", total_mib = 24576 }}]\n",
            dir.path().display()
        ),
    )
    .expect("config");
    let daemon = common::Daemon::start(env!("CARGO_BIN_EXE_vramgate"), &config);
    let url = daemon.url.clone();

    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        let client = reqwest::Client::new();
        let health = format!("{url}/vramgate/health");
        let leases = format!("{url}/vramgate/leases");
        let body = serde_json::json!({"vram": "1G", "holder": "bench", "wait": "0"});
        // Warm up the connection and the daemon.
        for _ in 0..200 {
            client.get(&health).send().await.expect("health").bytes().await.expect("body");
        }
        let start = Instant::now();
        for _ in 0..iterations {
            client.get(&health).send().await.expect("health").bytes().await.expect("body");
            client.get(&health).send().await.expect("health").bytes().await.expect("body");
        }
        let baseline = start.elapsed();
        let start = Instant::now();
        for _ in 0..iterations {
            let grant: serde_json::Value =
                client.post(&leases).json(&body).send().await.expect("lease").json().await.expect("grant");
            let id = grant["id"].as_str().expect("lease id");
            let status = client.delete(format!("{leases}/{id}")).send().await.expect("release").status();
            assert_eq!(status, 204);
        }
        let leased = start.elapsed();
        let rate = |d: Duration| iterations as f64 / d.as_secs_f64();
        println!("{iterations} iterations over loopback HTTP, one connection");
        println!(
            "baseline: 2 x GET /vramgate/health   {:>8.0} iterations/s  ({:.1} us each)",
            rate(baseline),
            us(baseline, iterations)
        );
        println!(
            "lease grant + release                {:>8.0} round trips/s ({:.1} us each) = {:.2}x baseline time",
            rate(leased),
            us(leased, iterations),
            leased.as_secs_f64() / baseline.as_secs_f64()
        );
    });
}

fn us(total: Duration, n: usize) -> f64 {
    total.as_secs_f64() * 1e6 / n as f64
}
