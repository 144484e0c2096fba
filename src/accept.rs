//! Accepting TCP connections the way every soul server does (the gate, the relay, `soul
//! connect`'s forward): a failed accept (out of file descriptors, say) is logged and retried
//! after a short wait, so it neither stops the server nor becomes a busy loop.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

/// How long a failed accept waits before the next.
const AFTER_A_FAILURE: Duration = Duration::from_millis(100);

/// The next connection on `listener`; `who` names the server in the log line of a failure.
pub async fn next(listener: &TcpListener, who: &str) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(accepted) => return accepted,
            Err(e) => {
                tracing::warn!("{who} cannot accept a connection: {e}");
                tokio::time::sleep(AFTER_A_FAILURE).await;
            }
        }
    }
}
