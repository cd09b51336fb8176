//! Stand-ins for an app's processes: a child process with a pid of its own, the sim memory it
//! claims per model, and an attached-app loop speaking the external-model protocol for it.

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value, json};

use super::{Daemon, write_atomically};

/// A child process standing in for an app or a job (it only needs to live); killed when dropped.
pub struct Proc(Child);

impl Proc {
    /// `sleep` in a new process group of its own (as a program started from a shell is), or in
    /// the group `group`.
    pub fn spawn(group: Option<u32>) -> Proc {
        let mut command = Command::new("sleep");
        command.arg("300");
        command.process_group(group.map_or(0, |g| g as i32));
        Proc(command.spawn().expect("spawn sleep"))
    }

    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What one app process holds on sim device 0: model id to MiB, written as the sum to the claim
/// file of its pid.
#[derive(Clone)]
pub struct Claims {
    file: PathBuf,
    held: Arc<Mutex<BTreeMap<String, u64>>>,
}

impl Claims {
    pub fn new(daemon: &Daemon, pid: u32) -> Claims {
        let dir = Daemon::sim_dir_for(&daemon.dir).join("0");
        std::fs::create_dir_all(&dir).unwrap();
        Claims { file: dir.join(pid.to_string()), held: Arc::new(Mutex::new(BTreeMap::new())) }
    }

    pub fn set(&self, model: &str, mib: u64) {
        let mut held = self.held.lock().unwrap();
        if mib == 0 {
            held.remove(model);
        } else {
            held.insert(model.to_string(), mib);
        }
        let total: u64 = held.values().sum();
        write_atomically(&self.file, &total.to_string());
    }
}

/// An app that attaches to external model `model` as process `pid` and carries out every
/// instruction at once: `gpu` claims `mib` under that pid, `cpu`/`release` gives it back.
pub async fn attach_as(
    daemon: &Daemon,
    model: &str,
    pid: u32,
    mib: u64,
    claims: Claims,
) -> tokio::task::JoinHandle<()> {
    attach_keeping(daemon, model, pid, mib, claims, false).await
}

/// As [`attach_as`]; with `keeps_memory`, moving the model off the GPU does not give its memory
/// back (PyTorch's caching allocator after `model.to("cpu")` without `torch.cuda.empty_cache()`).
pub async fn attach_keeping(
    daemon: &Daemon,
    model: &str,
    pid: u32,
    mib: u64,
    claims: Claims,
    keeps_memory: bool,
) -> tokio::task::JoinHandle<()> {
    let response = super::http::client()
        .post(format!("{}/vramgate/models/{model}/attach", daemon.url))
        .json(&json!({"pid": pid, "holder": format!("app-{pid}")}))
        .send()
        .await
        .expect("attach");
    assert_eq!(response.status(), 200, "attach {model}: {}", response.text().await.unwrap_or_default());
    let (url, model) = (daemon.url.clone(), model.to_string());
    tokio::spawn(async move {
        let mut stream = response.bytes_stream();
        let (mut pending, mut session) = (String::new(), String::new());
        while let Some(Ok(chunk)) = stream.next().await {
            pending.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = pending.find('\n') {
                let line: String = pending.drain(..=end).collect();
                let Ok(message) = serde_json::from_str::<Value>(&line) else { continue };
                match message["event"].as_str() {
                    Some("attached") => session = message["session"].as_str().unwrap_or_default().to_string(),
                    Some("instruction") => {
                        let on_gpu = message["action"] == "gpu";
                        if on_gpu || !keeps_memory {
                            claims.set(&model, if on_gpu { mib } else { 0 });
                        }
                        let ack = json!({"session": session, "seq": message["seq"], "ok": true});
                        let _ = super::http::client()
                            .post(format!("{url}/vramgate/models/{model}/ack"))
                            .json(&ack)
                            .send()
                            .await;
                    }
                    _ => {}
                }
            }
        }
    })
}

/// Polls status until `check` holds or `deadline` passes; unlike `wait_for_status` it does not
/// fail: for waiting on a precondition that only the buggy code produces.
pub async fn settle(daemon: &Daemon, deadline: Duration, check: impl Fn(&Value) -> bool) {
    let end = Instant::now() + deadline;
    while Instant::now() < end && !check(&daemon.status().await) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
