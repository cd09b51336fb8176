//! A fake client app holding an external model, as a CLIP model inside a Python app would.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use futures_util::StreamExt;
use serde_json::{Value, json};

use super::{Daemon, write_atomically};

/// What the app does with an instruction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// Carries it out (claims or frees its sim memory) and acknowledges it.
    Ok,
    /// Acknowledges it with `ok: false`.
    Fail,
    /// Never acknowledges it.
    Silent,
}

/// The app: it attaches with the test's pid; for `gpu` it claims `mib` of sim memory under that
/// pid, for `cpu`/`release` frees it, then acknowledges (as `answer` says for each action).
pub struct App {
    actions: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
    claim: PathBuf,
}

impl App {
    pub async fn attach(daemon: &Daemon, model: &str, mib: u64, answer: fn(&str) -> Answer) -> App {
        let response = super::http::client()
            .post(format!("{}/vramgate/models/{model}/attach", daemon.url))
            .json(&json!({"pid": std::process::id(), "holder": "test-app"}))
            .send()
            .await
            .expect("attach");
        assert_eq!(response.status(), 200, "attach: {}", response.text().await.unwrap_or_default());
        let claim = Daemon::sim_dir_for(&daemon.dir).join("0").join(std::process::id().to_string());
        let actions = Arc::new(Mutex::new(Vec::new()));
        let (url, model, seen, file) = (daemon.url.clone(), model.to_string(), actions.clone(), claim.clone());
        let task = tokio::spawn(async move {
            let mut stream = response.bytes_stream();
            let mut pending = String::new();
            let mut session = String::new();
            while let Some(Ok(chunk)) = stream.next().await {
                pending.push_str(&String::from_utf8_lossy(&chunk));
                while let Some(end) = pending.find('\n') {
                    let line: String = pending.drain(..=end).collect();
                    let Ok(message) = serde_json::from_str::<Value>(&line) else { continue };
                    match message["event"].as_str() {
                        Some("attached") => session = message["session"].as_str().unwrap_or_default().to_string(),
                        Some("instruction") => {
                            let action = message["action"].as_str().unwrap_or_default().to_string();
                            seen.lock().unwrap().push(action.clone());
                            let ack = match answer(&action) {
                                Answer::Silent => continue,
                                Answer::Ok => {
                                    if action == "gpu" {
                                        write_atomically(&file, &mib.to_string());
                                    } else {
                                        let _ = std::fs::remove_file(&file);
                                    }
                                    json!({"session": session, "seq": message["seq"], "ok": true})
                                }
                                Answer::Fail => json!({"session": session, "seq": message["seq"], "ok": false,
                                                       "error": format!("cannot do {action}")}),
                            };
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
        });
        App { actions, task, claim }
    }

    /// The instructions received so far.
    pub fn actions(&self) -> Vec<String> {
        self.actions.lock().unwrap().clone()
    }

    /// The app exits: its stream closes and its memory is gone with it.
    pub fn exit(self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.claim);
    }
}
