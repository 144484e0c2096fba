//! What `soul relay status` shows, and the loopback endpoint that serves it as JSON.

use super::*;

impl Relay {
    /// What `soul relay status` shows.
    pub fn status(&self) -> Status {
        let state = self.state();
        let mut stacks: Vec<StackStatus> = self
            .cfg
            .allow
            .keys()
            .map(|stack| {
                let mut sidecars: Vec<SidecarStatus> = state
                    .routes
                    .iter()
                    .filter(|((s, _), _)| s == stack)
                    .map(|((_, sidecar), r)| SidecarStatus {
                        sidecar: sidecar.clone(),
                        agent: r.agent.to_string(),
                        registered_at: r.since,
                        ready: r.ready.len(),
                        waiting: r.waiting.len(),
                        sessions_total: r.sessions_total,
                        public: r.public.clone(),
                        replaced: state
                            .replaced
                            .get(&(stack.clone(), sidecar.clone()))
                            .copied()
                            .unwrap_or(0),
                    })
                    .collect();
                sidecars.sort_by(|a, b| a.sidecar.cmp(&b.sidecar));
                StackStatus {
                    stack: stack.clone(),
                    open_sessions: state.open.get(stack).copied().unwrap_or(0),
                    sidecars,
                    names: self.cfg.domain.as_ref().map(|domain| {
                        let default = [format!("*-{stack}")];
                        self.cfg
                            .names
                            .get(stack)
                            .map_or(&default[..], |v| &v[..])
                            .iter()
                            .map(|l| format!("{l}.{domain}"))
                            .collect()
                    }),
                }
            })
            .collect();
        stacks.sort_by(|a, b| a.stack.cmp(&b.stack));
        Status {
            listen: self.cfg.listen.to_string(),
            domain: self.cfg.domain.clone(),
            pin: self.pin.clone(),
            uptime_s: self.started.elapsed().as_secs(),
            pending: state.pending_total,
            stacks,
        }
    }
}

/// The relay's state as `soul relay status` prints it.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Status {
    pub listen: String,
    /// The domain public names are under, when the relay gives any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    /// The pin of the relay's key: what stack.kdl's `relay … pin=` says.
    #[serde(default)]
    pub pin: String,
    pub uptime_s: u64,
    /// Connections that have not said where they go yet.
    pub pending: usize,
    /// Every allowed stack, registered or not.
    pub stacks: Vec<StackStatus>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct StackStatus {
    pub stack: String,
    pub open_sessions: usize,
    pub sidecars: Vec<SidecarStatus>,
    /// The public names it may claim (patterns like `*-home.relay.example.com`), when the
    /// relay gives any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub names: Option<Vec<String>>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct SidecarStatus {
    pub sidecar: String,
    /// The agent's address as the relay sees it.
    pub agent: String,
    /// Unix seconds.
    pub registered_at: u64,
    /// Data channels ready now.
    pub ready: usize,
    /// Devices waiting for one.
    pub waiting: usize,
    pub sessions_total: u64,
    /// The public name routed to it too, if it claimed one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public: Option<String>,
    /// How often a newer registration replaced this sidecar's since the relay started (a
    /// restart or a move counts once; a count that keeps growing means two machines serve
    /// the stack).
    #[serde(default)]
    pub replaced: u64,
}

/// Serves [`Relay::status`] as JSON on `GET /status` at `listener` (loopback by default).
pub async fn serve_status(relay: Arc<Relay>, listener: TcpListener) {
    use http_body_util::Full;
    use hyper_util::rt::TokioIo;
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let relay = relay.clone();
        tokio::spawn(async move {
            let svc =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let relay = relay.clone();
                    async move {
                        let (code, body) = if req.uri().path() == "/status" {
                            (
                                http::StatusCode::OK,
                                serde_json::to_vec(&relay.status()).unwrap_or_default(),
                            )
                        } else {
                            (http::StatusCode::NOT_FOUND, b"{}".to_vec())
                        };
                        Ok::<_, std::convert::Infallible>(
                            http::Response::builder()
                                .status(code)
                                .header(http::header::CONTENT_TYPE, "application/json")
                                .body(Full::new(bytes::Bytes::from(body)))
                                .expect("a static response"),
                        )
                    }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
