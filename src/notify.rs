//! Readiness notification for systemd (`Type=notify`): one datagram to the socket named by
//! `$NOTIFY_SOCKET` when the API accepts connections (`READY=1`) and one when shutdown begins
//! (`STOPPING=1`). Without that variable (any start not by systemd) nothing is sent.
//!
//! The protocol is a single `sd_notify(3)` datagram of `KEY=value` lines, so it is written here
//! with std's `UnixDatagram` rather than through a crate.

use std::ffi::OsStr;
use std::net::SocketAddr;
use std::os::unix::net::UnixDatagram;

/// The environment variable systemd sets for a `Type=notify` service.
const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Tells systemd the daemon is ready, and shows `addr` in `systemctl status`.
pub fn ready(addr: SocketAddr) {
    notify(&format!("READY=1\nSTATUS=listening on http://{addr}\n"));
}

/// Tells systemd the daemon is shutting down (model servers are being stopped).
pub fn stopping() {
    notify("STOPPING=1\nSTATUS=stopping model servers\n");
}

/// Sends `message` if the daemon runs under systemd. A failure is logged, never fatal: the
/// daemon works without the notification, and systemd reports the missing readiness itself.
fn notify(message: &str) {
    let Some(socket) = std::env::var_os(NOTIFY_SOCKET).filter(|s| !s.is_empty()) else {
        return;
    };
    if let Err(e) = send(&socket, message) {
        tracing::warn!("cannot notify systemd through {NOTIFY_SOCKET}={}: {e}", socket.to_string_lossy());
    }
}

/// Sends one datagram to `socket`: a filesystem path, or `@name` for Linux's abstract namespace.
fn send(socket: &OsStr, message: &str) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = socket.as_bytes();
    let sender = UnixDatagram::unbound()?;
    let sent = match bytes.first() {
        Some(b'/') => sender.send_to(message.as_bytes(), socket)?,
        Some(b'@') => {
            use std::os::linux::net::SocketAddrExt;
            let address = std::os::unix::net::SocketAddr::from_abstract_name(&bytes[1..])?;
            sender.send_to_addr(message.as_bytes(), &address)?
        }
        _ => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "neither an absolute path nor an abstract socket (@name)",
            ));
        }
    };
    if sent != message.len() {
        return Err(std::io::Error::other(format!("sent {sent} of {} bytes", message.len())));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::time::Duration;

    fn receive(socket: &UnixDatagram) -> String {
        socket.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        let mut buf = [0u8; 256];
        let n = socket.recv(&mut buf).expect("a datagram within 5 s");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn sends_to_a_socket_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify.sock");
        let listener = UnixDatagram::bind(&path).expect("bind");
        send(path.as_os_str(), "READY=1\n").expect("send");
        assert_eq!(receive(&listener), "READY=1\n");
    }

    #[test]
    fn sends_to_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("vramgate-notify-test-{}", std::process::id());
        let address = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).expect("address");
        let listener = UnixDatagram::bind_addr(&address).expect("bind");
        send(OsStr::new(&format!("@{name}")), "STOPPING=1\n").expect("send");
        assert_eq!(receive(&listener), "STOPPING=1\n");
    }

    #[test]
    fn other_socket_names_are_a_clear_error() {
        let error = send(OsStr::new("vsock:2:1234"), "READY=1\n").expect_err("unsupported");
        assert!(error.to_string().contains("abstract socket"), "{error}");
        let error = send(OsStr::new("/nonexistent/vramgate/notify.sock"), "READY=1\n").expect_err("no socket");
        assert_eq!(error.kind(), std::io::ErrorKind::NotFound, "{error}");
    }
}
