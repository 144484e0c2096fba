//! Copies bytes both ways between a device's connection and an agent's data channel until both
//! directions end, or until neither has carried a byte for the idle timeout. Half-closes pass
//! through (a client that finishes sending still gets the whole answer). Memory per session is
//! two fixed buffers.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

/// Each direction's buffer.
const BUFFER: usize = 64 * 1024;

/// What a finished session carried.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Carried {
    /// From the device to the pod.
    pub up: u64,
    /// From the pod to the device.
    pub down: u64,
    /// Whether it ended because it was idle.
    pub idle: bool,
}

/// Splices `device` and `pod` until both directions end or the session is idle for `idle`.
pub async fn splice(device: TcpStream, pod: TcpStream, idle: Duration) -> Carried {
    let start = Instant::now();
    let last = Arc::new(AtomicU64::new(0));
    let (device_read, device_write) = device.into_split();
    let (pod_read, pod_write) = pod.into_split();
    let up = copy(device_read, pod_write, idle, start, last.clone());
    let down = copy(pod_read, device_write, idle, start, last);
    let ((up, up_idle), (down, down_idle)) = tokio::join!(up, down);
    Carried {
        up,
        down,
        idle: up_idle || down_idle,
    }
}

/// One direction. Ends at EOF (passing the half-close on), at an error, or when neither
/// direction has moved a byte for `idle` (`last` is the other direction's clock too).
async fn copy(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    idle: Duration,
    start: Instant,
    last: Arc<AtomicU64>,
) -> (u64, bool) {
    let mut buf = vec![0u8; BUFFER];
    let mut total = 0u64;
    loop {
        let n = match tokio::time::timeout(idle, from.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => n,
            Err(_) => {
                let since = Duration::from_millis(last.load(Ordering::Relaxed));
                if start.elapsed().saturating_sub(since) >= idle {
                    // Shut both ways: the other direction's read ends with an error or EOF.
                    let _ = to.shutdown().await;
                    return (total, true);
                }
                continue;
            }
        };
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
        total += n as u64;
        last.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
    let _ = to.shutdown().await;
    (total, false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    #[tokio::test]
    async fn bytes_cross_both_ways_and_a_half_close_still_gets_the_answer() {
        let (mut device, device_side) = pair().await;
        let (pod_side, mut pod) = pair().await;
        let session = tokio::spawn(splice(device_side, pod_side, Duration::from_secs(5)));
        device.write_all(b"question").await.unwrap();
        device.shutdown().await.unwrap();
        let mut got = Vec::new();
        pod.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"question");
        pod.write_all(b"the answer").await.unwrap();
        pod.shutdown().await.unwrap();
        let mut answer = Vec::new();
        device.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer, b"the answer");
        let carried = session.await.unwrap();
        assert_eq!((carried.up, carried.down, carried.idle), (8, 10, false));
    }

    #[tokio::test]
    async fn an_idle_session_is_closed_but_a_one_way_download_is_not_idle() {
        let (mut device, device_side) = pair().await;
        let (pod_side, mut pod) = pair().await;
        let idle = Duration::from_millis(300);
        let session = tokio::spawn(splice(device_side, pod_side, idle));
        // The device sends nothing while the pod streams for longer than the idle timeout.
        for _ in 0..6 {
            pod.write_all(&[7u8; 1000]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut buf = vec![0u8; 6000];
        device.read_exact(&mut buf).await.unwrap();
        // Then nothing moves: the relay closes it.
        let carried = tokio::time::timeout(Duration::from_secs(5), session)
            .await
            .expect("an idle session ends")
            .unwrap();
        assert!(carried.idle);
        assert_eq!(carried.down, 6000);
        assert_eq!(
            device.read(&mut buf).await.unwrap(),
            0,
            "the device sees EOF"
        );
    }
}
