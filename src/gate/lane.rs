//! The gate's fast lane: the HTTP/1.1 requests a client sends with a credential the gate
//! takes — a device token (`Authorization: Bearer`, what `soul connect` and scripts send) or
//! this gate's browser session on a request that is not a write from another origin — are
//! proxied here, with one parse of each head (httparse), one write to the app and one to the
//! client, and the bodies passed through as they arrive: no per-request task, channel or
//! header map. Whatever is not such a request — no credential or one that fails, a pairing
//! link, `/.soul/` paths, `Transfer-Encoding` or other framing the lane does not take on,
//! upgrades, `Expect`, HTTP/1.0 or HTTP/2, a head too large or malformed — is handed over,
//! with every byte the lane has read, to the full server ([`super::serve_hyper`]), which
//! serves the rest of the connection: it refuses, logs and rate-limits, so there is one place
//! for every refusal.
//!
//! What reaches the app is what the full server would send: soul's bearer header and cookies
//! removed, hop-by-hop headers dropped, forwarding headers set from what the gate saw (RFC
//! 9110 §7.6.1).
//! Responses are framed by their own headers (RFC 9112 §6.3): none after `HEAD`, 1xx, 204 and
//! 304; `Transfer-Encoding` ending in chunked, read to its last chunk; `Content-Length`; or
//! until the app closes, which then closes the client's connection too.

use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

mod response;

use response::*;

/// Request headers the lane parses; a request with more is handed over.
const MAX_HEADERS: usize = 64;
/// Response headers and head size the lane accepts from the app: what the full server's
/// client (hyper's defaults) accepts. An app that sends more gets its client a 502.
const MAX_RESPONSE_HEADERS: usize = 100;
const MAX_RESPONSE_HEAD: usize = 8192 + 4096 * 100;
/// How much of a body is read at a time.
const CHUNK: usize = 32 * 1024;
/// What the client gets when the app does not answer usably, as from the full server.
const BAD_GATEWAY: &str = "the app is not answering\n";

/// How the lane left a connection.
pub(super) enum Outcome {
    /// Ended: the client closed it, asked to, or must not be served any further.
    Closed,
    /// A request the lane does not serve: the full server takes over from these bytes on.
    HandOver(BytesMut),
}

/// What the lane makes of the bytes a client has sent so far.
#[derive(Debug, PartialEq, Eq)]
enum Request {
    /// Not a whole head yet.
    Partial,
    /// Not the lane's request (or not HTTP the lane can read): the full server's.
    HandOver,
    /// A request to forward; its head for the app has been written out.
    Forward(Forward),
}

/// A request the lane forwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Forward {
    /// Its head is the first `head` bytes the client sent, and `body` bytes follow.
    head: usize,
    body: u64,
    /// `HEAD`: the response has no body whatever it says.
    no_body: bool,
    /// The client said `Connection: close`.
    close: bool,
    /// Sending it twice is harmless (RFC 9110 §9.2.2): the only requests sent again when a
    /// kept-alive connection to the app turns out closed.
    idempotent: bool,
}

/// What the lane knows of this gate and of the connection it saw.
pub(super) struct Seen<'a> {
    /// The client's address, as `X-Forwarded-For`.
    pub client: &'a [u8],
    /// Whether the gate terminated TLS on this connection.
    pub tls: bool,
    /// The gate's limit on a request's headers: a request with more is the full server's to
    /// refuse.
    pub max_headers: usize,
    /// This gate's session cookie.
    pub cookie: &'a str,
}

/// A credential a request shows the lane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Shown<'a> {
    /// A device token (`Authorization: Bearer`).
    Token(&'a str),
    /// This gate's session cookie, on a request that is not a cross-origin write.
    Session(&'a str),
}

/// Reads a request head from `buf`. A request the lane takes is one HTTP/1.1 request in
/// origin form outside `/.soul/`, with exactly one `Host`, a credential `authorize` says yes
/// to — one `Authorization` with the Bearer scheme, or else this gate's session cookie on a
/// request that is not a write from another origin — at most one plain `Content-Length` and
/// no other framing, no `Upgrade`, `Expect` or hop-by-hop header but `Connection`
/// (keep-alive or close), no query that might be soul's, at most one `Cookie` header, in
/// text. Its head for the app goes to `out`, without soul's cookies.
fn request(
    buf: &[u8],
    seen: &Seen,
    authorize: impl FnOnce(Shown) -> bool,
    out: &mut Vec<u8>,
) -> Request {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Request::Partial,
        Err(_) => return Request::HandOver,
    };
    let (Some(method), Some(target), Some(1)) = (req.method, req.path, req.version) else {
        return Request::HandOver;
    };
    let query = target.split_once('?').map_or("", |(_, q)| q);
    if req.headers.len() > seen.max_headers
        || !target.starts_with('/')
        || target.parse::<http::uri::PathAndQuery>().is_err()
        || target.starts_with("/.soul/")
        || super::policy::query_may_be_souls(query)
    {
        return Request::HandOver;
    }
    let (mut host, mut token, mut length, mut cookies) = (None, None, None, None);
    let (mut fetch_site, mut origin) = (None, None);
    let mut close = false;
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("host") {
            if host.replace(h.value).is_some() {
                return Request::HandOver;
            }
        } else if name.eq_ignore_ascii_case("authorization") {
            let Some(t) = std::str::from_utf8(h.value)
                .ok()
                .and_then(super::credential::bearer)
            else {
                return Request::HandOver;
            };
            if token.replace(t).is_some() {
                return Request::HandOver;
            }
        } else if name.eq_ignore_ascii_case("content-length") {
            let Some(n) = decimal(h.value) else {
                return Request::HandOver;
            };
            if length.replace(n).is_some() {
                return Request::HandOver;
            }
        } else if name.eq_ignore_ascii_case("connection") {
            for option in h.value.split(|b| *b == b',') {
                let option = option.trim_ascii();
                if option.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if !option.eq_ignore_ascii_case(b"keep-alive") {
                    return Request::HandOver;
                }
            }
        } else if name.eq_ignore_ascii_case("cookie") {
            let Some(text) = super::credential::text(h.value) else {
                return Request::HandOver;
            };
            if cookies.replace(text).is_some() {
                return Request::HandOver;
            }
        } else if name.eq_ignore_ascii_case("sec-fetch-site") {
            // The first one, as the full server reads it.
            fetch_site = fetch_site.or(Some(h.value));
        } else if name.eq_ignore_ascii_case("origin") {
            origin = origin.or(Some(h.value));
        } else if HANDED_OVER.iter().any(|n| name.eq_ignore_ascii_case(n)) {
            return Request::HandOver;
        }
    }
    let Some(host) = host else {
        return Request::HandOver;
    };
    let session = cookies.and_then(|c| {
        super::credential::cookie_pairs(c)
            .find(|(name, _)| *name == seen.cookie)
            .map(|(_, value)| value)
    });
    let shown = match (token, session) {
        (Some(t), _) => Shown::Token(t),
        (None, Some(s)) => {
            let provenance = super::credential::Provenance {
                safe: matches!(method, "GET" | "HEAD" | "OPTIONS" | "TRACE"),
                fetch_site: fetch_site.and_then(super::credential::text),
                origin,
                host: super::credential::text(host),
            };
            if super::credential::foreign(&provenance, seen.tls) {
                return Request::HandOver;
            }
            Shown::Session(s)
        }
        (None, None) => return Request::HandOver,
    };
    if !authorize(shown) {
        return Request::HandOver;
    }
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for h in req.headers.iter() {
        let name = h.name;
        if ["authorization", "connection", "cookie"]
            .iter()
            .chain(&super::policy::FORWARDING)
            .any(|n| name.eq_ignore_ascii_case(n))
        {
            continue;
        }
        header(out, name.as_bytes(), h.value);
    }
    if let Some(kept) = super::policy::app_cookies(cookies.into_iter()) {
        header(out, b"cookie", kept.as_bytes());
    }
    for (name, value) in super::policy::forwarded(seen.client, seen.tls, Some(host)) {
        header(out, name.as_bytes(), value);
    }
    out.extend_from_slice(b"\r\n");
    Request::Forward(Forward {
        head,
        body: length.unwrap_or(0),
        no_body: method == "HEAD",
        close,
        idempotent: matches!(
            method,
            "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
        ),
    })
}

/// Request headers that make a request the full server's: other framing, upgrades,
/// `Expect`, and hop-by-hop headers the lane would have to interpret.
const HANDED_OVER: &[&str] = &[
    "transfer-encoding",
    "upgrade",
    "expect",
    "te",
    "trailer",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "http2-settings",
];

fn header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// A `Content-Length` value: ASCII digits only (no sign, space or list), at most 18 of them.
fn decimal(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 18 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// The lane's connection to the app, kept for the client's next request.
struct App {
    stream: TcpStream,
    /// What the app sent that has not been passed on yet.
    read: BytesMut,
}

/// Why a request could not be completed.
enum Failed {
    /// The app did not answer usably: the client gets 502 and the lane goes on.
    App(String),
    /// A body was cut off half-way, or the client is gone: the connection ends.
    Connection,
}

/// What the lane needs of the gate and of the connection, and nothing more: the gate's
/// bounds, its session cookie's name, the app's address, who the client is, and whether a
/// credential shown on this connection admits (the gate's one policy decides).
pub(super) struct Door<'a> {
    pub(super) max_header_bytes: usize,
    pub(super) max_headers: usize,
    pub(super) header_timeout: std::time::Duration,
    pub(super) cookie: &'a str,
    pub(super) upstream: std::net::SocketAddr,
    /// The client, for the logs.
    pub(super) peer: std::net::SocketAddr,
    /// Whether the gate terminated TLS on this connection.
    pub(super) tls: bool,
    /// The client's address as the app's `X-Forwarded-For`.
    pub(super) forwarded_for: &'a [u8],
    pub(super) admits: &'a (dyn Fn(Shown) -> bool + Sync),
}

/// Serves `io`'s requests while they are the lane's; see the module's documentation.
pub(super) async fn serve<I>(io: &mut I, door: &Door<'_>) -> Outcome
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let mut read = BytesMut::with_capacity(8 * 1024);
    let (mut head, mut answer) = (Vec::with_capacity(1024), Vec::with_capacity(1024));
    let mut app: Option<App> = None;
    let max_head = door.max_header_bytes;
    let mut silence = Silence::new(door.header_timeout);
    loop {
        silence.next_head();
        let forward = loop {
            head.clear();
            let seen = Seen {
                client: door.forwarded_for,
                tls: door.tls,
                max_headers: door.max_headers,
                cookie: door.cookie,
            };
            match request(&read, &seen, door.admits, &mut head) {
                Request::Forward(forward) => break forward,
                Request::HandOver => return Outcome::HandOver(read),
                Request::Partial if read.len() >= max_head => return Outcome::HandOver(read),
                Request::Partial => {}
            }
            let got = tokio::select! {
                biased;
                got = io.read_buf(&mut read) => got,
                () = &mut silence.timer => return Outcome::Closed,
            };
            match got {
                Ok(n) if n > 0 => {}
                // Ended or failed (or, above, silent for too long between or inside heads).
                _ => return Outcome::Closed,
            }
        };
        read.advance(forward.head);
        let here = forward.body.min(read.len() as u64) as usize;
        head.extend_from_slice(&read[..here]);
        read.advance(here);
        let rest = forward.body - here as u64;
        let exchanged = exchange(
            io,
            &mut read,
            &mut app,
            door.upstream,
            &head,
            rest,
            &forward,
            &mut answer,
        );
        match exchanged.await {
            Ok(true) if !forward.close => {}
            Ok(_) => return Outcome::Closed,
            Err(Failed::App(e)) => {
                tracing::warn!(source = %door.peer, "the app did not answer: {e}");
                app = None;
                let answer = format!(
                    "HTTP/1.1 502 Bad Gateway\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\n\r\n{BAD_GATEWAY}",
                    BAD_GATEWAY.len()
                );
                if rest > 0 || send(io, answer.as_bytes()).await.is_err() {
                    return Outcome::Closed;
                }
            }
            Err(Failed::Connection) => return Outcome::Closed,
        }
    }
}

/// How long a client may take to send a request's head, from the end of its last request:
/// at least the header timeout and at most an eighth more. One timer per connection, set
/// again only when it would give the next head less than the timeout, so most requests of a
/// busy connection leave the runtime's timer wheel alone.
struct Silence {
    timer: std::pin::Pin<Box<tokio::time::Sleep>>,
    timeout: std::time::Duration,
}

impl Silence {
    fn new(timeout: std::time::Duration) -> Silence {
        Silence {
            timer: Box::pin(tokio::time::sleep(timeout)),
            timeout,
        }
    }

    /// A new head begins: it gets the timeout from now, whatever the last one used.
    fn next_head(&mut self) {
        let now = tokio::time::Instant::now();
        if self.timer.deadline() < now + self.timeout {
            self.timer
                .as_mut()
                .reset(now + self.timeout + self.timeout / 8);
        }
    }
}

/// Sends one request (`head`, then `rest` more body bytes from the client) to the app and
/// passes its response on. True when the client's connection can take another request. A
/// kept-alive connection to the app that the app has closed while idle is not used; one it
/// closes as the request arrives gets an idempotent request whole in `head` once more, on a
/// new connection.
#[allow(clippy::too_many_arguments)]
async fn exchange<I>(
    io: &mut I,
    read: &mut BytesMut,
    app: &mut Option<App>,
    upstream: std::net::SocketAddr,
    head: &[u8],
    rest: u64,
    forward: &Forward,
    answer: &mut Vec<u8>,
) -> Result<bool, Failed>
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let mut retried = false;
    if app.as_ref().is_some_and(|c| !c.idle_and_open()) {
        *app = None;
    }
    let conn = loop {
        let reused = app.is_some();
        let mut conn = match app.take() {
            Some(c) => c,
            None => App {
                stream: connect(upstream)
                    .await
                    .map_err(|e| Failed::App(e.to_string()))?,
                read: BytesMut::with_capacity(16 * 1024),
            },
        };
        let sent = conn.stream.write_all(head).await;
        if sent.is_ok() && rest > 0 {
            // The client's body streams to the app; what the client sent beyond it stays in
            // `read` for its next request.
            copy(io, read, &mut conn.stream, rest).await?;
        }
        match (sent, first_bytes(&mut conn).await) {
            (Ok(()), Ok(true)) => break conn,
            (sent, got) if reused && !retried && rest == 0 && forward.idempotent => {
                // The kept-alive connection was closed under us: a fresh one, once.
                tracing::debug!(
                    "the app closed a kept-alive connection: {:?} {:?}",
                    sent.err(),
                    got.err()
                );
                retried = true;
            }
            (Err(e), _) | (_, Err(e)) => return Err(Failed::App(e.to_string())),
            (Ok(()), Ok(false)) => return Err(Failed::App("it closed the connection".into())),
        }
    };
    let conn = app.insert(conn);
    loop {
        answer.clear();
        match response(&conn.read, forward.no_body, answer) {
            Response::Partial => {
                let n = conn
                    .stream
                    .read_buf(&mut conn.read)
                    .await
                    .map_err(|e| Failed::App(e.to_string()))?;
                if n == 0 {
                    return Err(Failed::App("it closed the connection mid-answer".into()));
                }
            }
            Response::Bad => {
                return Err(Failed::App(
                    "its answer is not HTTP/1.1 the gate passes on".into(),
                ));
            }
            Response::Ready {
                head,
                framing,
                interim,
                reusable,
            } => {
                conn.read.advance(head);
                if interim {
                    send(io, answer).await?;
                    continue;
                }
                let client_ok = pass_body(io, conn, framing, answer).await?;
                if !reusable || !conn.read.is_empty() {
                    // Done with, or it sent more than it was asked for.
                    *app = None;
                }
                return Ok(client_ok && framing != Framing::UntilClose);
            }
        }
    }
}

impl App {
    /// Whether this idle connection can carry a request: the app has neither closed it nor
    /// sent anything unasked on it. Looks without waiting: only when the connection has
    /// turned readable does it read (one byte at most).
    fn idle_and_open(&self) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match self.stream.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            Poll::Ready(Ok(())) => matches!(
                self.stream.try_read(&mut [0u8; 1]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
            ),
        }
    }
}

/// Waits for the app's first bytes of an answer: false when it closed the connection first.
async fn first_bytes(conn: &mut App) -> std::io::Result<bool> {
    if !conn.read.is_empty() {
        return Ok(true);
    }
    Ok(conn.stream.read_buf(&mut conn.read).await? > 0)
}

/// Passes a response's body on after its head (`answer`), as the app sends it. True when the
/// body ended where its framing said.
async fn pass_body<I>(
    io: &mut I,
    conn: &mut App,
    framing: Framing,
    answer: &mut Vec<u8>,
) -> Result<bool, Failed>
where
    I: AsyncWrite + Unpin,
{
    match framing {
        Framing::Empty => send(io, answer).await.map(|()| true),
        Framing::Length(n) => {
            let here = n.min(conn.read.len() as u64) as usize;
            answer.extend_from_slice(&conn.read[..here]);
            conn.read.advance(here);
            send(io, answer).await?;
            copy(&mut conn.stream, &mut conn.read, io, n - here as u64).await?;
            Ok(true)
        }
        Framing::Chunked => {
            let mut chunked = Chunked::default();
            loop {
                let used = chunked.advance(&conn.read).ok_or(Failed::Connection)?;
                answer.extend_from_slice(&conn.read[..used]);
                conn.read.advance(used);
                send(io, answer).await?;
                answer.clear();
                if chunked.done() {
                    return Ok(true);
                }
                if conn
                    .stream
                    .read_buf(&mut conn.read)
                    .await
                    .map_err(|_| Failed::Connection)?
                    == 0
                {
                    return Err(Failed::Connection);
                }
            }
        }
        Framing::UntilClose => {
            answer.extend_from_slice(&conn.read);
            conn.read.clear();
            send(io, answer).await?;
            loop {
                conn.read.reserve(CHUNK);
                match conn.stream.read_buf(&mut conn.read).await {
                    Ok(0) | Err(_) => return Ok(true),
                    Ok(_) => {
                        send(io, &conn.read).await?;
                        conn.read.clear();
                    }
                }
            }
        }
    }
}

async fn send<W: AsyncWrite + Unpin>(to: &mut W, bytes: &[u8]) -> Result<(), Failed> {
    to.write_all(bytes).await.map_err(|_| Failed::Connection)?;
    to.flush().await.map_err(|_| Failed::Connection)
}

/// Moves exactly `n` bytes from `from` to `to`, through `buf` (empty on entry, and on return
/// holding whatever `from` sent beyond them).
async fn copy<R, W>(from: &mut R, buf: &mut BytesMut, to: &mut W, mut n: u64) -> Result<(), Failed>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    while n > 0 {
        if buf.is_empty() {
            buf.reserve(CHUNK);
            let limit = (n as usize).min(CHUNK);
            let mut limited = (&mut *from).take(limit as u64);
            if limited
                .read_buf(buf)
                .await
                .map_err(|_| Failed::Connection)?
                == 0
            {
                return Err(Failed::Connection);
            }
        }
        let here = (n as usize).min(buf.len());
        send(to, &buf[..here]).await?;
        buf.advance(here);
        n -= here as u64;
    }
    Ok(())
}

async fn connect(upstream: std::net::SocketAddr) -> std::io::Result<TcpStream> {
    let stream = TcpStream::connect(upstream).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEEN: Seen = Seen {
        client: b"192.0.2.7",
        tls: false,
        max_headers: 8,
        cookie: "soul_home_notes",
    };

    /// The credentials the tests' gate takes: the token `good` and the session `fine`.
    fn good(shown: Shown) -> bool {
        matches!(shown, Shown::Token("good") | Shown::Session("fine"))
    }

    /// The lane's reading of `raw` with a token that is good when it is `good`, and the head
    /// it would send the app.
    fn read(raw: &str) -> (Request, String) {
        let mut out = Vec::new();
        let r = request(raw.as_bytes(), &SEEN, good, &mut out);
        (r, String::from_utf8(out).unwrap())
    }

    fn forwarded(raw: &str) -> String {
        match read(raw) {
            (Request::Forward(_), head) => head,
            (other, _) => panic!("not forwarded: {other:?} for {raw:?}"),
        }
    }

    #[test]
    fn a_programs_request_goes_to_the_app_without_soul_credentials_or_forged_forwarding() {
        let head = forwarded(
            "GET /notes?page=2 HTTP/1.1\r\nHost: pod:8443\r\nauthorization: bearer good\r\nConnection: keep-alive\r\nX-Forwarded-For: 6.6.6.6\r\nForwarded: for=6.6.6.6\r\nX-Real-IP: 6.6.6.6\r\nAccept: */*\r\nCookie: theme=dark\r\n\r\n",
        );
        assert_eq!(
            head,
            "GET /notes?page=2 HTTP/1.1\r\nHost: pod:8443\r\nAccept: */*\r\ncookie: theme=dark\r\nx-forwarded-for: 192.0.2.7\r\nx-forwarded-proto: http\r\nx-forwarded-host: pod:8443\r\n\r\n"
        );
    }

    #[test]
    fn a_browsers_session_goes_to_the_app_without_any_soul_cookie() {
        let head = forwarded(
            "GET /notes HTTP/1.1\r\nHost: x\r\nCookie: theme=dark; soul_home_notes=fine;soul_home_other=s; lang=en\r\n\r\n",
        );
        assert!(
            head.contains("\r\ncookie: theme=dark; lang=en\r\n"),
            "{head}"
        );
        assert!(!head.contains("soul_"), "{head}");
        // Only soul's cookies: no cookie header at all; a token wins over the cookie.
        let head = forwarded(
            "GET / HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer good\r\nCookie: soul_home_notes=stale\r\n\r\n",
        );
        assert!(!head.to_ascii_lowercase().contains("cookie"), "{head}");
        // A write from the page's own origin, by Fetch Metadata or by Origin.
        for provenance in [
            "Sec-Fetch-Site: same-origin",
            "Origin: http://x",
            "Origin: http://x:80",
        ] {
            forwarded(&format!(
                "POST /save HTTP/1.1\r\nHost: x\r\nCookie: soul_home_notes=fine\r\n{provenance}\r\nContent-Length: 0\r\n\r\n"
            ));
        }
    }

    #[test]
    fn the_head_and_body_lengths_are_told_and_a_partial_head_waits() {
        let raw = "POST /up HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer good\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello";
        let (r, _) = read(raw);
        assert_eq!(
            r,
            Request::Forward(Forward {
                head: raw.len() - 5,
                body: 5,
                no_body: false,
                close: true,
                idempotent: false,
            })
        );
        assert_eq!(read(&raw[..20]).0, Request::Partial);
        let (r, _) = read("HEAD / HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer good\r\n\r\n");
        assert!(matches!(
            r,
            Request::Forward(Forward {
                no_body: true,
                body: 0,
                idempotent: true,
                ..
            })
        ));
    }

    #[test]
    fn what_the_lane_does_not_serve_is_handed_over() {
        let ok = "Host: x\r\nAuthorization: Bearer good\r\n";
        for raw in [
            // No, a bad, a second or another credential.
            "GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_string(),
            "GET / HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer bad\r\n\r\n".into(),
            format!("GET / HTTP/1.1\r\n{ok}Authorization: Bearer good\r\n\r\n"),
            "GET / HTTP/1.1\r\nHost: x\r\nAuthorization: Basic Z29vZA==\r\n\r\n".into(),
            // soul's own paths, links, cookies, however spelled.
            format!("GET /.soul/health HTTP/1.1\r\n{ok}\r\n"),
            format!("GET /?soul_ticket=t HTTP/1.1\r\n{ok}\r\n"),
            format!("GET /?SOUL_TOKEN=t HTTP/1.1\r\n{ok}\r\n"),
            format!("GET /?%73oul_token=t HTTP/1.1\r\n{ok}\r\n"),
            format!("GET / HTTP/1.1\r\n{ok}Cookie: a=1\r\nCookie: b=2\r\n\r\n"),
            format!("GET / HTTP/1.1\r\n{ok}Cookie: a=é\r\n\r\n"),
            // A session that is not good, or this gate's cookie under another name.
            "GET / HTTP/1.1\r\nHost: x\r\nCookie: soul_home_notes=stale\r\n\r\n".into(),
            "GET / HTTP/1.1\r\nHost: x\r\nCookie: soul_home_other=fine\r\n\r\n".into(),
            "GET / HTTP/1.1\r\nHost: x\r\nCookie: SOUL_HOME_NOTES=fine\r\n\r\n".into(),
            // A session riding a write from another origin, or an opaque one.
            "POST / HTTP/1.1\r\nHost: x\r\nCookie: soul_home_notes=fine\r\nSec-Fetch-Site: cross-site\r\n\r\n".into(),
            "POST / HTTP/1.1\r\nHost: x\r\nCookie: soul_home_notes=fine\r\nOrigin: http://evil.example\r\n\r\n".into(),
            "DELETE / HTTP/1.1\r\nHost: x\r\nCookie: soul_home_notes=fine\r\nOrigin: null\r\n\r\n".into(),
            "POST / HTTP/1.1\r\nHost: x\r\nCookie: soul_home_notes=fine\r\nOrigin: https://x\r\n\r\n".into(),
            // Framing, upgrades and hop-by-hop headers it does not interpret.
            format!("POST / HTTP/1.1\r\n{ok}Transfer-Encoding: chunked\r\n\r\n"),
            format!("POST / HTTP/1.1\r\n{ok}Content-Length: 5\r\nContent-Length: 6\r\n\r\n"),
            format!("POST / HTTP/1.1\r\n{ok}Content-Length: +5\r\n\r\n"),
            format!("POST / HTTP/1.1\r\n{ok}Content-Length: 5, 5\r\n\r\n"),
            format!("GET / HTTP/1.1\r\n{ok}Upgrade: websocket\r\nConnection: Upgrade\r\n\r\n"),
            format!("GET / HTTP/1.1\r\n{ok}Connection: keep-alive, X-Secret\r\n\r\n"),
            format!("POST / HTTP/1.1\r\n{ok}Expect: 100-continue\r\nContent-Length: 1\r\n\r\n"),
            format!("GET / HTTP/1.1\r\n{ok}TE: trailers\r\n\r\n"),
            format!("GET / HTTP/1.1\r\n{ok}Proxy-Authorization: Basic x\r\n\r\n"),
            // Other versions and forms, two hosts, no host, malformed heads.
            format!("GET / HTTP/1.0\r\n{ok}\r\n"),
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".into(),
            format!("GET http://evil/ HTTP/1.1\r\n{ok}\r\n"),
            format!("GET / HTTP/1.1\r\n{ok}Host: y\r\n\r\n"),
            "GET / HTTP/1.1\r\nAuthorization: Bearer good\r\n\r\n".into(),
            format!("GET / HTTP/1.1\r\n{ok}X-Folded: a\r\n b\r\n\r\n"),
            format!("GET / HTTP/1.1\r\n{ok}Bad Name: a\r\n\r\n"),
            format!("GET / HTTP/1.1\r\n{ok}{}\r\n", "A: 1\r\n".repeat(7)),
        ] {
            let mut out = Vec::new();
            let r = request(raw.as_bytes(), &SEEN, good, &mut out);
            assert_eq!(r, Request::HandOver, "{raw:?}");
        }
    }

    fn answer(raw: &str, no_body: bool) -> (Response, String) {
        let mut out = Vec::new();
        let r = response(raw.as_bytes(), no_body, &mut out);
        (r, String::from_utf8(out).unwrap())
    }

    #[test]
    fn a_response_is_framed_by_its_own_headers() {
        let framing = |raw: &str, no_body: bool| match answer(raw, no_body).0 {
            Response::Ready { framing, .. } => framing,
            other => panic!("{other:?} for {raw:?}"),
        };
        let ok = "HTTP/1.1 200 OK\r\n";
        assert_eq!(
            framing(&format!("{ok}Content-Length: 4\r\n\r\n"), false),
            Framing::Length(4)
        );
        assert_eq!(
            framing(&format!("{ok}Content-Length: 4\r\n\r\n"), true),
            Framing::Empty
        );
        assert_eq!(
            framing("HTTP/1.1 204 No Content\r\n\r\n", false),
            Framing::Empty
        );
        assert_eq!(
            framing(
                "HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n",
                false
            ),
            Framing::Empty
        );
        assert_eq!(
            framing(
                &format!("{ok}Transfer-Encoding: gzip, chunked\r\nContent-Length: 4\r\n\r\n"),
                false
            ),
            Framing::Chunked
        );
        assert_eq!(
            framing(&format!("{ok}Transfer-Encoding: gzip\r\n\r\n"), false),
            Framing::UntilClose
        );
        assert_eq!(framing(&format!("{ok}\r\n"), false), Framing::UntilClose);
        assert_eq!(
            answer(
                &format!("{ok}Content-Length: 4\r\nContent-Length: 5\r\n\r\n"),
                false
            )
            .0,
            Response::Bad
        );
        assert_eq!(
            answer(&format!("{ok}Content-Length: -1\r\n\r\n"), false).0,
            Response::Bad
        );
        assert_eq!(
            answer(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n",
                false
            )
            .0,
            Response::Bad
        );
        assert_eq!(answer("garbage\r\n\r\n", false).0, Response::Bad);
        assert_eq!(answer(ok, false).0, Response::Partial);
        assert!(matches!(
            answer("HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n", false).0,
            Response::Ready {
                interim: true,
                framing: Framing::Empty,
                ..
            }
        ));
    }

    #[test]
    fn a_response_reaches_the_client_without_hop_by_hop_headers() {
        let (r, head) = answer(
            "HTTP/1.1 200 Fine\r\nConnection: close, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\nContent-Type: text/plain\r\n\r\n",
            false,
        );
        assert_eq!(
            head,
            "HTTP/1.1 200 Fine\r\nTransfer-Encoding: chunked\r\nContent-Type: text/plain\r\n\r\n"
        );
        assert!(matches!(
            r,
            Response::Ready {
                reusable: false,
                framing: Framing::Chunked,
                ..
            }
        ));
        // A body that runs to the close says so, and an HTTP/1.0 answer is not kept.
        let (r, head) = answer("HTTP/1.0 200 OK\r\n\r\n", false);
        assert_eq!(head, "HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n");
        assert!(matches!(
            r,
            Response::Ready {
                reusable: false,
                ..
            }
        ));
        let (r, _) = answer("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", false);
        assert!(matches!(r, Response::Ready { reusable: true, .. }));
    }

    #[test]
    fn a_chunked_body_ends_at_its_last_chunk_however_it_is_split() {
        let body =
            b"5;ext=1\r\nhello\r\n1a\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nTrailer: x\r\n\r\nNEXT";
        let end = body.len() - 4;
        for split in 0..body.len() {
            let mut c = Chunked::default();
            let first = c.advance(&body[..split]).unwrap();
            assert_eq!(first, split.min(end));
            if !c.done() {
                assert_eq!(c.advance(&body[split..]).unwrap(), end - split);
            }
            assert!(c.done(), "split at {split}");
        }
        // No size, a size without data, data not ended by CRLF, a bare LF, a size over 64 bits.
        let bad = [
            "x\r\n",
            "\r\n",
            "5\r\nhello\r\r",
            "5\nhello",
            "fffffffffffffffff\r\n",
        ];
        for bad in bad.map(str::as_bytes) {
            assert_eq!(
                Chunked::default().advance(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    /// One header line a hostile or careless client might send.
    fn any_header() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        prop_oneof![
            Just("Authorization: Bearer secret-token-1\r\n".to_string()),
            Just("authorization: BEARER secret-token-1\r\n".to_string()),
            Just("Authorization: Bearer secret-token-2\r\n".to_string()),
            Just("Host: x\r\n".to_string()),
            Just("Cookie: a=1; soul_home_notes=s\r\n".to_string()),
            Just("Cookie: a=1\r\n".to_string()),
            Just("Cookie: soul_home_notes=fine; b=2\r\n".to_string()),
            Just("Cookie: b=2; soul_home_other=x; soul_home_notes=fine\r\n".to_string()),
            Just("Sec-Fetch-Site: cross-site\r\n".to_string()),
            Just("Origin: http://evil.example\r\n".to_string()),
            Just("Content-Length: 3\r\n".to_string()),
            Just("Transfer-Encoding: chunked\r\n".to_string()),
            Just("Connection: close\r\n".to_string()),
            Just("Connection: keep-alive, Authorization\r\n".to_string()),
            Just("X-Forwarded-For: 6.6.6.6\r\n".to_string()),
            "[A-Za-z-]{1,12}: [ -~]{0,20}\r\n",
        ]
    }

    proptest::proptest! {
        #[test]
        fn no_bytes_make_the_lane_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let mut out = Vec::new();
            let _ = request(&bytes, &SEEN, |_| true, &mut out);
            out.clear();
            let _ = response(&bytes, false, &mut out);
            let mut c = Chunked::default();
            if let Some(n) = c.advance(&bytes) {
                proptest::prop_assert!(n <= bytes.len());
            }
        }

        #[test]
        fn a_forwarded_head_never_carries_a_soul_credential_or_a_forged_forwarding_header(
            method in "GET|POST",
            target in "/[a-z?=&%_]{0,8}(\\?soul_ticket=t)?",
            headers in proptest::collection::vec(any_header(), 0..8),
        ) {
            let raw = format!("{method} {target} HTTP/1.1\r\n{}\r\n", headers.concat());
            let mut out = Vec::new();
            let mut by_session = false;
            let r = request(raw.as_bytes(), &SEEN, |s| {
                by_session = matches!(s, Shown::Session(_));
                matches!(s, Shown::Token("secret-token-1") | Shown::Session("fine"))
            }, &mut out);
            if let Request::Forward(_) = r {
                // A session only rides a write from the page's own origin.
                let foreign = raw.contains("cross-site") || raw.contains("evil.example");
                proptest::prop_assert!(
                    !(method == "POST" && foreign && by_session),
                    "{}", raw
                );
                let head = String::from_utf8(out).unwrap();
                let lower = head.to_ascii_lowercase();
                proptest::prop_assert!(!lower.contains("secret-token"), "{}", head);
                proptest::prop_assert!(!lower.contains("\nauthorization:"), "{}", head);
                proptest::prop_assert!(!lower.contains("soul_home"), "{}", head);
                proptest::prop_assert!(!target.contains("soul_"), "{}", head);
                proptest::prop_assert!(!lower.contains("6.6.6.6"), "{}", head);
                proptest::prop_assert!(!lower.contains("transfer-encoding"), "{}", head);
                proptest::prop_assert_eq!(lower.matches("x-forwarded-for: 192.0.2.7\r\n").count(), 1);
            }
        }
    }

    /// A request head as the app would get it: method, target, and its headers as
    /// (lower-case name, value), sorted (the engines order them differently).
    type Canonical = (String, String, Vec<(String, String)>);

    fn canonical_of(head: &[u8]) -> Canonical {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut r = httparse::Request::new(&mut headers);
        r.parse(head).expect("a forwarded head parses");
        let mut hs: Vec<(String, String)> = r
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_ascii_lowercase(),
                    String::from_utf8_lossy(h.value).into_owned(),
                )
            })
            .collect();
        hs.sort();
        (
            r.method.unwrap_or_default().to_string(),
            r.path.unwrap_or_default().to_string(),
            hs,
        )
    }

    /// What the full server would send the app for `raw` (or `None` where it answers itself:
    /// a refusal, a link, a pairing path), with the same credentials good as the lane's tests.
    fn full_server(raw: &[u8]) -> Option<Canonical> {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut r = httparse::Request::new(&mut headers);
        let Ok(httparse::Status::Complete(_)) = r.parse(raw) else {
            return None;
        };
        let mut b = http::Request::builder()
            .method(r.method?)
            .uri(r.path?)
            .version(http::Version::HTTP_11);
        for h in r.headers.iter() {
            b = b.header(h.name, h.value);
        }
        let mut req = b.body(()).ok()?;
        if req.uri().path().starts_with("/.soul/") {
            return None;
        }
        use super::super::credential::{self, Presented};
        let admitted = match credential::presented(&req, SEEN.cookie) {
            Presented::Bearer(t) => good(Shown::Token(t.expose())),
            Presented::Session(v) => {
                !credential::foreign_origin(&req, SEEN.tls) && good(Shown::Session(v.expose()))
            }
            _ => false,
        };
        if !admitted {
            return None;
        }
        credential::strip(&mut req);
        let upgrade = req.headers().contains_key(http::header::UPGRADE);
        super::super::forward::request(
            req.headers_mut(),
            http::HeaderValue::from_static("192.0.2.7"),
            SEEN.tls,
            upgrade,
        );
        let mut head = format!(
            "{} {} HTTP/1.1\r\n",
            req.method(),
            req.uri().path_and_query().map_or("/", |p| p.as_str())
        )
        .into_bytes();
        for (name, value) in req.headers() {
            head.extend_from_slice(name.as_str().as_bytes());
            head.extend_from_slice(b": ");
            head.extend_from_slice(value.as_bytes());
            head.extend_from_slice(b"\r\n");
        }
        head.extend_from_slice(b"\r\n");
        Some(canonical_of(&head))
    }

    /// Headers a client might send, friendly and hostile.
    const POOL: &[(&str, &str)] = &[
        ("Host", "h:1"),
        ("Authorization", "Bearer good"),
        ("authorization", "bearer good"),
        ("Authorization", "Bearer bad"),
        ("Cookie", "theme=dark; soul_home_notes=fine"),
        ("Cookie", "soul_home_notes=fine; soul_home_wiki=x"),
        ("cookie", "a=1"),
        ("X-Forwarded-For", "6.6.6.6"),
        ("Forwarded", "for=6.6.6.6"),
        ("X-Real-IP", "6.6.6.6"),
        ("X-Forwarded-Host", "evil"),
        ("Connection", "keep-alive"),
        ("Connection", "close"),
        ("Connection", "x-secret"),
        ("x-secret", "1"),
        ("Content-Length", "0"),
        ("Transfer-Encoding", "chunked"),
        ("Upgrade", "websocket"),
        ("Origin", "http://evil.example"),
        ("Origin", "http://h:1"),
        ("Sec-Fetch-Site", "cross-site"),
        ("Sec-Fetch-Site", "same-origin"),
        ("Accept", "*/*"),
        ("TE", "trailers"),
        ("Keep-Alive", "timeout=5"),
        ("Proxy-Authorization", "Basic x"),
        ("X-Custom", "v"),
    ];

    proptest::proptest! {
        /// The two engines are one policy: for any request head the lane forwards, the full
        /// server would forward exactly the same head to the app (and would admit it).
        #[test]
        fn the_lane_and_the_full_server_forward_the_same_head(
            method in proptest::sample::select(vec!["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS"]),
            target in proptest::sample::select(vec![
                "/", "/a/b", "/x?page=2&sort=asc", "/x?soul_ticket=t", "/x?a=%41", "/.soul/health",
            ]),
            picks in proptest::collection::vec(0..POOL.len(), 0..10),
        ) {
            let mut raw = format!("{method} {target} HTTP/1.1\r\n");
            for i in &picks {
                let (name, value) = POOL[*i];
                raw.push_str(&format!("{name}: {value}\r\n"));
            }
            raw.push_str("\r\n");
            let mut out = Vec::new();
            if let Request::Forward(_) = request(raw.as_bytes(), &SEEN, good, &mut out) {
                let full = full_server(raw.as_bytes());
                proptest::prop_assert!(full.is_some(), "the lane forwards what the full server refuses: {}", raw);
                proptest::prop_assert_eq!(canonical_of(&out), full.unwrap(), "{}", raw);
            }
        }
    }
}
