//! `soul pair --serve`: a page for people pairing their phones. It shows every (device, sidecar)
//! pairing code of the stack, large enough to scan from a laptop screen, and the browser link
//! beside it, read from the state dir that `apply`/`watch` keep current. The page asks for the
//! codes again every second and swaps them in when they changed, so an address change or a
//! re-issued token shows the new code without a reload.
//!
//! The codes are credentials (each ticket pairs one browser), so the server listens on loopback
//! only and answers only under a random path, printed once on the terminal: another user of the
//! machine who finds the port gets 404.

use std::convert::Infallible;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;

use crate::html::escape;
use crate::stack::Stack;
use crate::state::{StateDir, layout};

/// What the page serves: the stack's codes from its state dir, under `/<secret>/`.
pub struct PairPage {
    stack: Stack,
    state: StateDir,
    secret: String,
}

impl PairPage {
    /// A page under a fresh random path.
    pub fn new(stack: Stack, state: StateDir) -> std::io::Result<PairPage> {
        let mut bytes = [0u8; 16];
        getrandom::fill(&mut bytes).map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(PairPage {
            stack,
            state,
            secret: hex::encode(bytes),
        })
    }

    /// The path the page answers under, `/<secret>/`.
    pub fn path(&self) -> String {
        format!("/{}/", self.secret)
    }

    /// Serves on `listener` until `shutdown` resolves.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> std::io::Result<()> {
        let page = std::sync::Arc::new(self);
        tokio::pin!(shutdown);
        loop {
            let (stream, _) = tokio::select! {
                r = listener.accept() => r?,
                () = &mut shutdown => return Ok(()),
            };
            let page = page.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let page = page.clone();
                    async move { Ok::<_, Infallible>(page.answer(&req)) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    }

    fn answer(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        let Some(rest) = req.uri().path().strip_prefix(&self.path()) else {
            return reply(StatusCode::NOT_FOUND, "text/plain", b"not found\n".to_vec());
        };
        match rest {
            "" => reply(
                StatusCode::OK,
                "text/html; charset=utf-8",
                self.page().into(),
            ),
            "codes" => reply(
                StatusCode::OK,
                "text/html; charset=utf-8",
                self.codes().into(),
            ),
            qr => match qr.strip_prefix("qr/").and_then(|q| q.strip_suffix(".svg")) {
                Some(pair) => match self.svg(pair) {
                    Some(svg) => reply(StatusCode::OK, "image/svg+xml", svg),
                    None => reply(StatusCode::NOT_FOUND, "text/plain", b"no code\n".to_vec()),
                },
                None => reply(StatusCode::NOT_FOUND, "text/plain", b"not found\n".to_vec()),
            },
        }
    }

    /// The SVG of `<device>/<sidecar>`, only for pairs the stack declares.
    fn svg(&self, pair: &str) -> Option<Vec<u8>> {
        let (device, sidecar) = pair.split_once('/')?;
        self.pairs()
            .any(|(d, s)| d == device && s == sidecar)
            .then(|| {
                self.state
                    .read(&format!("{}.svg", layout::pairing(device, sidecar)))
            })?
            .ok()
    }

    fn pairs(&self) -> impl Iterator<Item = (&str, &str)> {
        self.stack.devices.iter().flat_map(|d| {
            self.stack
                .sidecars
                .iter()
                .map(move |s| (d.name.as_str(), s.name.as_str()))
        })
    }

    /// Every code as HTML: the image (its URL changes with the file) and the first browser link.
    fn codes(&self) -> String {
        let mut html = String::new();
        for (device, sidecar) in self.pairs() {
            let base = layout::pairing(device, sidecar);
            let (device, sidecar) = (escape(device), escape(sidecar));
            let Ok(svg) = self.state.read(&format!("{base}.svg")) else {
                html.push_str(&format!(
                    "<section><h2>{device} → {sidecar}</h2><p>no code yet: run <code>soul apply</code></p></section>\n"
                ));
                continue;
            };
            let version = &hex::encode(Sha256::digest(&svg))[..16];
            let link = self
                .state
                .read(&format!("{base}.link"))
                .ok()
                .and_then(|l| String::from_utf8_lossy(&l).lines().next().map(escape))
                .unwrap_or_default();
            html.push_str(&format!(
                "<section><h2>{device} → {sidecar}</h2><img alt=\"pairing code of {device} for {sidecar}\" src=\"qr/{device}/{sidecar}.svg?v={version}\"><p>Scan with the phone's camera, or open on this computer: <a href=\"{link}\">{link}</a></p></section>\n"
            ));
        }
        html
    }

    fn page(&self) -> String {
        format!(
            "<!doctype html><html><head><meta charset=utf-8><title>Pair a device with {stack}</title>\
<meta name=viewport content=\"width=device-width\"><meta name=referrer content=no-referrer>\
<style>body{{font-family:sans-serif;margin:2em;background:#fff;color:#111}}\
section{{display:inline-block;vertical-align:top;margin:0 2em 2em 0;max-width:420px}}\
img{{width:400px;height:400px;image-rendering:pixelated}}a{{word-break:break-all}}</style></head>\
<body><h1>Pair a device with {stack}</h1><p>Each code pairs one browser, once. This page follows \
the state dir: a new address or a re-issued token shows here by itself. Stop it with Ctrl-C in the \
terminal that started it.</p><main id=codes>{codes}</main><script>\
let last=document.getElementById('codes').innerHTML;\
setInterval(async()=>{{try{{const r=await fetch('codes',{{cache:'no-store'}});\
const html=await r.text();if(r.ok&&html!==last){{last=html;document.getElementById('codes').innerHTML=html;}}}}catch(e){{}}}},1000);\
</script></body></html>",
            stack = escape(&self.stack.stack),
            codes = self.codes(),
        )
    }
}

fn reply(status: StatusCode, kind: &'static str, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    let headers = r.headers_mut();
    headers.insert(header::CONTENT_TYPE, header::HeaderValue::from_static(kind));
    headers.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        header::HeaderValue::from_static(
            "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; connect-src 'self'",
        ),
    );
    r
}
