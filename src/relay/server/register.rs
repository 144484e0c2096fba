//! Registration: an agent's control channel, TLS that ends here with the relay's own key;
//! the challenge signed for this TLS session; the channel key and the ids of the data channels
//! it opens; the pings that keep it.

use super::*;

impl Relay {
    /// An agent's control channel: TLS with the relay's key (its ClientHello already read as
    /// `hello`), then the magic and the agent's hello. Still pending until registered.
    pub(super) async fn agent(
        self: Arc<Relay>,
        stream: TcpStream,
        peer: SocketAddr,
        hello: Vec<u8>,
        pending: Pending,
    ) {
        let timeout = self.cfg.limits.hello_timeout;
        let acceptor = tokio_rustls::TlsAcceptor::from(self.tls.clone());
        let io = Rewind::new(bytes::BytesMut::from(&hello[..]), stream);
        let opened = tokio::time::timeout(timeout, async {
            let mut tls = acceptor.accept(io).await.map_err(wire::FrameError::Io)?;
            let mut magic = [0u8; wire::MAGIC.len()];
            tls.read_exact(&mut magic).await?;
            if &magic != wire::MAGIC {
                return Err(wire::FrameError::Io(std::io::ErrorKind::InvalidData.into()));
            }
            let hello = wire::read_frame::<_, Hello>(&mut tls).await?;
            Ok((tls, hello))
        })
        .await;
        match opened {
            Ok(Ok((
                tls,
                Hello::Control {
                    stack,
                    sidecar,
                    key,
                    public,
                },
            ))) => {
                let Some(binding) = wire::session_binding(tls.get_ref().1) else {
                    return;
                };
                let claim = Claim {
                    stack,
                    sidecar,
                    key,
                    public: public.map(|p| p.to_ascii_lowercase()),
                };
                self.control(tls, peer, claim, binding, pending).await;
            }
            Ok(Err(e)) => tracing::debug!(source = %peer, "not an agent: {e}"),
            Err(_) => tracing::debug!(source = %peer, "an agent's hello timed out"),
        }
    }

    /// A control channel: registers, then pings and forwards requests for data channels until
    /// the agent is gone.
    async fn control<S>(
        self: Arc<Relay>,
        mut stream: S,
        peer: SocketAddr,
        claim: Claim,
        binding: [u8; 32],
        pending: Pending,
    ) where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let Claim {
            stack,
            sidecar,
            key,
            public,
        } = claim;
        let route = format!("{sidecar}.{stack}");
        let Some(allowed) = self.cfg.allow.get(&stack) else {
            let why = format!(
                "stack `{stack}` is not allowed here (add its `soul relay allow` line to the relay's file)"
            );
            return self.refuse(&mut stream, peer, &route, why).await;
        };
        if wire::parse_public(&key).as_ref() != Some(allowed) {
            let why = format!("this key is not the one allowed for stack `{stack}`");
            return self.refuse(&mut stream, peer, &route, why).await;
        }
        let nonce = wire::random_b64(32);
        let challenge = ToAgent::Challenge {
            nonce: nonce.clone(),
        };
        let signed = tokio::time::timeout(self.cfg.limits.hello_timeout, async {
            wire::write_frame(&mut stream, &challenge).await?;
            wire::read_frame::<_, FromAgent>(&mut stream)
                .await
                .map_err(std::io::Error::other)
        })
        .await;
        let Ok(Ok(FromAgent::Signature { signature })) = signed else {
            return self
                .refuse(&mut stream, peer, &route, "no signature came".into())
                .await;
        };
        let nonce = wire::decode_nonce(&nonce).expect("the relay's own nonce decodes");
        if !wire::verify(allowed, &stack, &sidecar, &nonce, &binding, &signature) {
            let why = "the signature does not verify (for this TLS session)".to_string();
            return self.refuse(&mut stream, peer, &route, why).await;
        }
        let (control, mut requests) = mpsc::channel(64);
        let mut channel_key = [0u8; 32];
        getrandom::fill(&mut channel_key).expect("the operating system's random generator works");
        let registered = {
            let mut state = self.state();
            let key = (stack.clone(), sidecar.clone());
            let others = state
                .routes
                .keys()
                .filter(|(s, c)| *s == stack && *c != sidecar)
                .count();
            if others >= self.cfg.limits.sidecars_per_stack {
                None
            } else {
                state.next_id += 1;
                let id = state.next_id;
                let mut replaced = None;
                if let Some(old) = state.routes.remove(&key) {
                    replaced = Some(old.agent.to_string());
                    // Told, so that it says so instead of registering again at once.
                    let _ = old.control.try_send(ToAgent::Replaced {
                        by: peer.to_string(),
                    });
                    *state.replaced.entry(key.clone()).or_default() += 1;
                    for id in old.expected.values() {
                        state.channels.remove(id);
                    }
                    if let Some(name) = &old.public {
                        state.names.remove(name);
                    }
                    tracing::info!(source = %peer, "{route}: a new registration replaces the one from {}", old.agent);
                }
                let public_refused = public.as_ref().and_then(|name| {
                    if !self.cfg.may_claim(&stack, name) {
                        return Some(match &self.cfg.domain {
                            None => format!("this relay gives no public names (its file has no `domain`), so `{name}` is not routed"),
                            Some(d) => format!("`{name}` is not a name stack `{stack}` may claim here (names under {d} that its `allow` line gives it: by default `<sidecar>-{stack}.{d}`)"),
                        });
                    }
                    match state.names.get(name) {
                        Some(holder) if *holder != key => Some(format!(
                            "`{name}` is held by another registration ({}.{})",
                            holder.1, holder.0
                        )),
                        _ => None,
                    }
                });
                let granted = public.filter(|_| public_refused.is_none());
                if let Some(name) = &granted {
                    state.names.insert(name.clone(), key.clone());
                }
                let mut route = Route {
                    id,
                    channel_key,
                    expected: BTreeMap::new(),
                    agent: peer,
                    since: unix_now(),
                    control,
                    ready: VecDeque::new(),
                    waiting: VecDeque::new(),
                    sessions_total: 0,
                    public: granted,
                };
                let (_, ids) = route.advance(0);
                for (seq, channel) in ids {
                    state.channels.insert(channel, (key.clone(), seq));
                }
                state.routes.insert(key, route);
                Some((id, public_refused, replaced))
            }
        };
        let Some((id, public_refused, replaced)) = registered else {
            let why = format!(
                "stack `{stack}` already has its limit of {} registered sidecars",
                self.cfg.limits.sidecars_per_stack
            );
            return self.refuse(&mut stream, peer, &route, why).await;
        };
        drop(pending);
        let registered = ToAgent::Registered {
            channel_key: base64::Engine::encode(
                &base64::engine::general_purpose::STANDARD,
                channel_key,
            ),
            ready: self.cfg.limits.ready,
            public_refused: public_refused.clone(),
            replaced,
        };
        if wire::write_frame(&mut stream, &registered).await.is_ok() {
            match &public_refused {
                Some(why) => {
                    tracing::warn!(source = %peer, "registered {route} without its public name: {why}")
                }
                None => tracing::info!(source = %peer, "registered {route}"),
            }
            let (mut read, mut write) = tokio::io::split(stream);
            let mut ping = tokio::time::interval(PING_EVERY);
            let reader = async {
                loop {
                    match tokio::time::timeout(
                        CONTROL_SILENCE,
                        wire::read_frame::<_, FromAgent>(&mut read),
                    )
                    .await
                    {
                        Ok(Ok(FromAgent::Pong)) => {}
                        _ => return,
                    }
                }
            };
            let writer = async {
                loop {
                    let message = tokio::select! {
                        m = requests.recv() => match m { Some(m) => m, None => return },
                        _ = ping.tick() => ToAgent::Ping,
                    };
                    if wire::write_frame(&mut write, &message).await.is_err() {
                        return;
                    }
                }
            };
            tokio::select! {
                () = reader => {}
                () = writer => {}
            }
        }
        let mut state = self.state();
        if state
            .routes
            .get(&(stack.clone(), sidecar.clone()))
            .map(|r| r.id)
            == Some(id)
        {
            if let Some(r) = state.routes.remove(&(stack, sidecar)) {
                for id in r.expected.values() {
                    state.channels.remove(id);
                }
                if let Some(name) = &r.public {
                    state.names.remove(name);
                }
            }
            tracing::info!(source = %peer, "unregistered {route}: its control channel ended");
        }
    }
}

/// What an agent's hello claims: a sidecar of a stack, with the stack's key, and maybe a public
/// name.
pub(super) struct Claim {
    stack: String,
    sidecar: String,
    key: String,
    public: Option<String>,
}

impl Relay {
    /// Tells an agent why it is not registered, and logs it (once per interval per source).
    pub(super) async fn refuse<S: AsyncWrite + Unpin>(
        &self,
        stream: &mut S,
        peer: SocketAddr,
        route: &str,
        why: String,
    ) {
        self.refused(
            peer.ip(),
            format_args!("refused the registration of {route}: {why}"),
        );
        let _ = wire::write_frame(stream, &ToAgent::Refused { reason: why }).await;
    }
}

impl Route {
    /// Data channel `used` came: the ids the relay now expects reach [`CHANNEL_WINDOW`] past
    /// the highest used, and those more than a window behind it are dropped. Returns the ids
    /// dropped and the ids added, by number.
    pub(super) fn advance(&mut self, used: u64) -> (Vec<ChannelId>, Vec<(u64, ChannelId)>) {
        let floor = used.saturating_sub(CHANNEL_WINDOW);
        let kept = self.expected.split_off(&floor);
        let stale = std::mem::replace(&mut self.expected, kept)
            .into_values()
            .collect();
        let from = self.expected.keys().next_back().map_or(0, |last| last + 1);
        let mut added = Vec::new();
        for seq in from.max(used)..=used + CHANNEL_WINDOW {
            if let std::collections::btree_map::Entry::Vacant(e) = self.expected.entry(seq) {
                let id = wire::channel_id(&self.channel_key, seq);
                e.insert(id);
                added.push((seq, id));
            }
        }
        (stale, added)
    }
}

/// The relay's TLS for agents' control channels: its own key, no session tickets (an agent
/// keeps one control channel), TLS 1.3 only.
pub(super) fn server_tls(identity: &crate::tls::Identity) -> Arc<rustls::ServerConfig> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let cert = CertificateDer::from_pem_slice(identity.cert_pem.as_bytes())
        .expect("the relay's own certificate parses");
    let key = PrivateKeyDer::from_pem_slice(identity.key_pem.as_bytes())
        .expect("the relay's own key parses");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("ring supports TLS 1.3")
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .expect("the relay's own key matches its certificate");
    cfg.send_tls13_tickets = 0;
    Arc::new(cfg)
}
