//! Helpers shared by the benchmarks.

#![allow(dead_code)] // each bench uses a different subset

use std::time::{Duration, Instant};

/// The value after `--NAME` on the command line, or `default`.
pub fn arg<T: std::str::FromStr>(name: &str, default: T) -> T {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|s| s.parse().ok()).unwrap_or(default)
}

/// Median and p99 of `samples` timed runs of `f`, after `warmup` untimed ones.
pub fn measure(samples: usize, warmup: usize, mut f: impl FnMut()) -> (Duration, Duration) {
    for _ in 0..warmup {
        f();
    }
    let mut times: Vec<Duration> = (0..samples.max(1))
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed()
        })
        .collect();
    times.sort();
    (times[times.len() / 2], times[(times.len() * 99 / 100).min(times.len() - 1)])
}

/// A `vramgate serve` started on a config file, killed when dropped.
pub struct Daemon {
    child: std::process::Child,
    /// Its base URL.
    pub url: String,
}

impl Daemon {
    /// Starts the daemon binary on `config` (port chosen by the OS) and waits for its address.
    pub fn start(binary: &str, config: &std::path::Path) -> Daemon {
        use std::io::BufRead;
        let mut child = std::process::Command::new(binary)
            .args(["serve", "--listen", "127.0.0.1:0", "--config"])
            .arg(config)
            .env("VRAMGATE_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start vramgate");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("address");
        let url = line.split_whitespace().find(|w| w.starts_with("http://")).expect("url").to_string();
        Daemon { child, url }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
