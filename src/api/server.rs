//! The HTTP server: accepts connections (at most `server.max_connections` at once), serves each
//! with hyper's HTTP/1 connection (closed when a request's head does not arrive within
//! `server.header_read_timeout`: half-sent requests cannot hold connections forever), and drains
//! them gracefully when shutdown begins. axum's own `serve` exposes neither bound.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// The longest header-read timeout the server arms: hyper adds it to the current instant
/// unchecked, so a larger one (config check bounds it too) is cut to this.
pub const MAX_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(24 * 60 * 60);

/// The bounds the server keeps.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// `server.max_connections`: connections served at once. Beyond it, new connections wait in
    /// the listen backlog (they are accepted when one closes), so the daemon's memory and file
    /// descriptors stay bounded; a client sees a slow connect, not an error.
    pub max_connections: usize,
    /// `server.header_read_timeout`: how long a request's head (request line and headers) may
    /// take to arrive, including the wait for the next request on an idle keep-alive
    /// connection; the connection is closed after it. `None` = never.
    pub header_read_timeout: Option<Duration>,
    /// `proxy.client_timeout`: how long a write to a client may stay blocked before its
    /// connection is closed. `None` = never.
    pub write_timeout: Option<Duration>,
}

/// Serves `app` on `listener` until `shutdown` is cancelled, then stops accepting and waits for
/// open connections to finish their requests (idle ones close at once). The caller bounds that
/// wait (the daemon gives it 700 ms).
pub async fn serve(listener: TcpListener, app: Router, settings: ServerSettings, shutdown: CancellationToken) {
    let slots = Arc::new(Semaphore::new(settings.max_connections.clamp(1, Semaphore::MAX_PERMITS)));
    let graceful = GracefulShutdown::new();
    let mut listener = ClientListener { inner: listener, write_timeout: settings.write_timeout };
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout.map(|t| t.min(MAX_HEADER_READ_TIMEOUT)));
    loop {
        // A slot first: beyond the cap, connections wait in the kernel's backlog.
        let slot = tokio::select! {
            _ = shutdown.cancelled() => break,
            slot = Arc::clone(&slots).acquire_owned() => match slot {
                Ok(slot) => slot,
                // The semaphore is never closed; if it were, stop serving.
                Err(_) => break,
            },
        };
        let io = tokio::select! {
            _ = shutdown.cancelled() => break,
            (io, _addr) = axum::serve::Listener::accept(&mut listener) => io,
        };
        let service = TowerToHyperService::new(app.clone());
        let connection = graceful.watch(builder.serve_connection(TokioIo::new(io), service));
        tokio::spawn(async move {
            // A client that goes away or times out is routine, not worth more than a debug line.
            if let Err(e) = connection.await {
                tracing::debug!("connection closed: {e}");
            }
            drop(slot);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// Accepts client connections with `TCP_NODELAY` and a write timeout. Streamed tokens are small
/// writes: without `TCP_NODELAY`, Nagle's algorithm holds each one back until the previous is
/// acknowledged. The write timeout (`proxy.client_timeout`) closes a connection whose client
/// stopped reading: otherwise the server stops polling that answer's body, and the model the
/// answer pins could never be evicted.
struct ClientListener {
    inner: TcpListener,
    write_timeout: Option<Duration>,
}

impl axum::serve::Listener for ClientListener {
    type Io = std::pin::Pin<Box<tokio_io_timeout::TimeoutStream<tokio::net::TcpStream>>>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        // axum's own accept logs and retries transient errors (out of file descriptors).
        let (tcp, addr) = axum::serve::Listener::accept(&mut self.inner).await;
        let _ = tcp.set_nodelay(true);
        let mut stream = tokio_io_timeout::TimeoutStream::new(tcp);
        stream.set_write_timeout(self.write_timeout);
        (Box::pin(stream), addr)
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}
