//! The small programs soul runs inside pods from its own image: `soul pause` (owns the pod's
//! network namespace), `soul demo-app` (the repository stack's offline demo service) and
//! `soul probe` (the HTTP health check for soul's image, which has no curl).

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Sleeps until SIGTERM or SIGINT, then exits cleanly.
pub async fn pause() -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

/// A tiny HTTP responder: `/healthz` answers `ok`, an upgrade on `/echo` echoes what it is
/// sent, `/bytes/<n>` streams n bytes, every other path a greeting that includes `$GREETING` when set. One access-log line
/// per request on stdout.
pub async fn demo_app(
    port: u16,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    let listener = TcpListener::bind(("0.0.0.0", port)).await?;
    println!("demo-app listening on :{port}");
    let greeting =
        std::env::var("GREETING").unwrap_or_else(|_| "hello from soul's demo app".into());
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => r?,
            _ = &mut shutdown => return Ok(()),
        };
        let greeting = greeting.clone();
        tokio::spawn(async move {
            if let Ok(Some(path)) = serve_one(stream, &greeting).await {
                println!("{peer} GET {path}");
            }
        });
    }
}

async fn serve_one(mut stream: TcpStream, greeting: &str) -> std::io::Result<Option<String>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let head = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok::<_, std::io::Error>(None);
            }
            buf.extend_from_slice(&chunk[..n]);
            if buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.len() > 16 * 1024 {
                return Ok(Some(()));
            }
        }
    })
    .await;
    if !matches!(head, Ok(Ok(Some(())))) {
        return Ok(None);
    }
    let text = String::from_utf8_lossy(&buf);
    let path = text.split_whitespace().nth(1).unwrap_or("/").to_string();
    if path == "/echo" && text.to_ascii_lowercase().contains("\r\nupgrade:") {
        // An upgraded connection (a WebSocket's handshake, minus the framing) that echoes
        // every byte: what a live connection through the gate looks like.
        stream
            .write_all(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n")
            .await?;
        let (mut from, mut to) = stream.split();
        tokio::io::copy(&mut from, &mut to).await?;
        return Ok(Some(path));
    }
    if let Some(n) = path
        .strip_prefix("/bytes/")
        .and_then(|n| n.parse::<u64>().ok())
    {
        // `n` bytes, streamed: a large download for tests and benchmarks, in constant memory.
        stream
            .write_all(
                format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: {n}\r\nconnection: close\r\n\r\n"
                )
                .as_bytes(),
            )
            .await?;
        let block = vec![b'x'; 64 * 1024];
        let mut left = n;
        while left > 0 {
            let k = left.min(block.len() as u64) as usize;
            stream.write_all(&block[..k]).await?;
            left -= k as u64;
        }
        stream.shutdown().await?;
        return Ok(Some(path));
    }
    let body = if path == "/healthz" {
        "ok\n".to_string()
    } else {
        format!("{greeting}\n")
    };
    let response = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await?;
    Ok(Some(path))
}

/// Why a probe failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("only http:// URLs with a host and port can be probed: {0}")]
    Url(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("timed out")]
    Timeout,
    #[error("answered {0}")]
    Status(String),
}

/// GETs an `http://host[:port]/path` URL with hyper's HTTP/1.1 client; succeeds on a 2xx or 3xx
/// answer.
pub async fn probe(url: &str, timeout: Duration) -> Result<(), ProbeError> {
    let (status, _) = get(url, timeout).await?;
    if status.is_success() || status.is_redirection() {
        Ok(())
    } else {
        Err(ProbeError::Status(status.to_string()))
    }
}

/// `GET url` (plain `http://`), within `timeout`: the status and the body (at most 1 MiB).
pub async fn get(
    url: &str,
    timeout: Duration,
) -> Result<(http::StatusCode, bytes::Bytes), ProbeError> {
    use http_body_util::BodyExt as _;
    let bad = || ProbeError::Url(url.into());
    let uri: http::Uri = url.parse().map_err(|_| bad())?;
    let authority = match (uri.scheme_str(), uri.authority()) {
        (Some("http"), Some(a)) if !a.host().is_empty() => a.clone(),
        _ => return Err(bad()),
    };
    let addr = format!(
        "{}:{}",
        authority.host(),
        authority.port_u16().unwrap_or(80)
    );
    let io = |e| ProbeError::Io(std::io::Error::other(e));
    let work = async {
        let stream = TcpStream::connect(&addr).await?;
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(io)?;
        tokio::spawn(conn);
        let request = http::Request::get(uri.path_and_query().map_or("/", |p| p.as_str()))
            .header(http::header::HOST, authority.as_str())
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .map_err(|_| bad())?;
        let response = send.send_request(request).await.map_err(io)?;
        let status = response.status();
        let body = http_body_util::Limited::new(response.into_body(), 1 << 20)
            .collect()
            .await
            .map_err(|e| ProbeError::Io(std::io::Error::other(e.to_string())))?
            .to_bytes();
        Ok::<_, ProbeError>((status, body))
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| ProbeError::Timeout)?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn demo_app_answers_and_probe_accepts_it() {
        let probe_port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(demo_app(probe_port, async {
            let _ = rx.await;
        }));
        let url = format!("http://127.0.0.1:{probe_port}/healthz");
        let mut ok = false;
        for _ in 0..50 {
            if probe(&url, Duration::from_secs(1)).await.is_ok() {
                ok = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(ok, "probe never succeeded");
        let _ = tx.send(());
        server.await.unwrap().unwrap();
        assert!(probe(&url, Duration::from_millis(500)).await.is_err());
        assert!(matches!(
            probe("https://x/", Duration::from_secs(1)).await,
            Err(ProbeError::Url(_))
        ));
    }
}
