//! Stand-in HTTP servers inside the test process, for model servers and Ollamas that misbehave in
//! ways the fake binaries cannot (an endless streamed event, a flood, a huge tool-call index, a
//! 500 from Ollama). Plain HTTP/1.0 on a tokio listener: nothing but the Rust toolchain is needed.
//!
//! A process model needs a process of its own that listens on the port the daemon chose: for it,
//! [`port_reporting_cmd`] is a `sh` that writes `${PORT}` into a file and then sleeps (the model's
//! process, stopped by the daemon like any), and [`StandIn::on_reported_port`] serves on that
//! port from the test once the file appears.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The body of a stand-in's answer.
pub enum Body {
    /// These bytes, with a `content-length`.
    Once(Vec<u8>),
    /// `chunk` written `times` times (forever with `None`, until the client stops reading or
    /// goes away), then `then`; the end of the body is the end of the connection.
    Repeat { chunk: Vec<u8>, times: Option<usize>, then: Vec<u8> },
}

/// A stand-in's answer to one request.
pub struct Reply {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Body,
}

impl Reply {
    /// A JSON answer.
    pub fn json(status: u16, value: &serde_json::Value) -> Reply {
        Reply { status, content_type: "application/json", body: Body::Once(value.to_string().into_bytes()) }
    }
}

/// What a stand-in answers: given the method, the path and the request body.
pub type Handler = Arc<dyn Fn(&str, &str, &[u8]) -> Reply + Send + Sync>;

/// A model server whose health check is fine and whose every answer is one SSE event of
/// `chunks` data lines of 64 KiB each before the blank line that ends it.
pub fn one_long_event(chunks: usize) -> Handler {
    Arc::new(move |method, _, _| match method {
        "GET" => Reply::json(200, &serde_json::json!({})),
        _ => Reply {
            status: 200,
            content_type: "text/event-stream",
            body: Body::Repeat {
                chunk: [b"data: ".as_slice(), &[b'x'; 65536], b"\n"].concat(),
                times: Some(chunks),
                then: b"\n".to_vec(),
            },
        },
    })
}

/// A stand-in server; it stops when dropped.
pub struct StandIn {
    task: tokio::task::JoinHandle<()>,
}

impl StandIn {
    /// Serves on a free loopback port; returns it with its URL.
    pub async fn start(handler: Handler) -> (StandIn, String) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind a stand-in");
        let url = format!("http://{}", listener.local_addr().expect("its address"));
        (StandIn { task: tokio::spawn(serve(listener, handler)) }, url)
    }

    /// Serves on the port that [`port_reporting_cmd`] writes into `port_file`, once it is there
    /// (within 20 s; afterwards the stand-in gives up and the test's own deadline fails it).
    pub fn on_reported_port(port_file: PathBuf, handler: Handler) -> StandIn {
        let task = tokio::spawn(async move {
            let end = Instant::now() + Duration::from_secs(20);
            let port = loop {
                // Complete once the newline is written.
                if let Ok(text) = std::fs::read_to_string(&port_file)
                    && let Some(port) = text.strip_suffix('\n').and_then(|p| p.trim().parse::<u16>().ok())
                {
                    break port;
                }
                if Instant::now() > end {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            };
            let Ok(listener) = TcpListener::bind(("127.0.0.1", port)).await else { return };
            serve(listener, handler).await;
        });
        StandIn { task }
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A process model's `cmd` (a TOML array) whose process writes the port it was given into
/// `DIR/port` and then only lives; the file's path is returned with it.
pub fn port_reporting_cmd(dir: &Path) -> (String, PathBuf) {
    let file = dir.join("port");
    let cmd = format!("[\"sh\", \"-c\", \"echo ${{PORT}} > '{}' && exec sleep 300\"]", file.display());
    (cmd, file)
}

async fn serve(listener: TcpListener, handler: Handler) {
    while let Ok((stream, _)) = listener.accept().await {
        tokio::spawn(answer(stream, handler.clone()));
    }
}

/// Reads one request (head up to 64 KiB, then `content-length` bytes of body) and answers it.
async fn answer(mut stream: TcpStream, handler: Handler) {
    let mut request = Vec::new();
    let mut buffer = [0u8; 8192];
    let head_end = loop {
        if let Some(at) = request.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        if request.len() > 64 * 1024 {
            return;
        }
        match stream.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => request.extend_from_slice(&buffer[..n]),
        }
    };
    let head = String::from_utf8_lossy(&request[..head_end]).to_string();
    let mut words = head.split_whitespace();
    let (method, path) = (words.next().unwrap_or_default().to_string(), words.next().unwrap_or_default().to_string());
    let length = head
        .lines()
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, value)| value.trim().parse::<usize>().ok())
        .unwrap_or(0);
    let mut body = request.split_off(head_end);
    while body.len() < length {
        match stream.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => body.extend_from_slice(&buffer[..n]),
        }
    }
    let reply = handler(&method, &path, &body);
    let mut head = format!("HTTP/1.0 {} Stand-in\r\ncontent-type: {}\r\n", reply.status, reply.content_type);
    if let Body::Once(bytes) = &reply.body {
        head.push_str(&format!("content-length: {}\r\n", bytes.len()));
    }
    head.push_str("connection: close\r\n\r\n");
    if stream.write_all(head.as_bytes()).await.is_err() {
        return;
    }
    match reply.body {
        Body::Once(bytes) => {
            let _ = stream.write_all(&bytes).await;
        }
        Body::Repeat { chunk, times, then } => {
            let mut written = 0;
            while times.is_none_or(|times| written < times) {
                if stream.write_all(&chunk).await.is_err() {
                    return;
                }
                written += 1;
            }
            let _ = stream.write_all(&then).await;
        }
    }
    let _ = stream.shutdown().await;
}
