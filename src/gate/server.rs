//! The gate's listener: connections accepted into their slots ([`super::slots`]), TLS told
//! from plain HTTP by the first byte, each connection served by the fast lane
//! ([`super::lane`]) while its requests are the lane's and by the full server (hyper)
//! otherwise, and closed when a device it authenticated as is revoked.

use super::*;

/// Concurrent requests one HTTP/2 connection may have in flight.
pub(super) const H2_MAX_STREAMS: u32 = 128;

/// `soul gate`: listens on `listen` and serves on `threads` threads (one per CPU it may use
/// when `None`) until `shutdown` resolves.
pub async fn run(
    cfg: GateConfig,
    listen: SocketAddr,
    threads: Option<usize>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), GateError> {
    let listener = std::net::TcpListener::bind(listen).map_err(|source| GateError::Listen {
        addr: listen,
        source,
    })?;
    let threads =
        threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let (stop, stopped) = watch::channel(false);
    let gate = tokio::task::spawn_blocking(move || serve(cfg, listener, threads, stopped));
    tokio::pin!(gate);
    let served = tokio::select! {
        r = &mut gate => r,
        () = shutdown => {
            let _ = stop.send(true);
            gate.await
        }
    };
    served
        .map_err(|e| GateError::Serve(std::io::Error::other(e)))?
        .map_err(GateError::Serve)
}

/// Serves on `threads` threads until `shutdown` is set. Each thread runs a single-threaded
/// runtime of its own that accepts from the one listening socket, so a connection lives on
/// one thread from accept to close and its requests never wake another core (the model of
/// nginx's worker processes). Blocks until every thread has stopped.
pub fn serve(
    cfg: GateConfig,
    listener: std::net::TcpListener,
    threads: usize,
    shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let (keys_tx, keys_rx) = watch::channel(
        load(&cfg.keys_dir, cfg.sidecar.as_deref(), cfg.public.as_ref())
            .ok()
            .map(Arc::new),
    );
    let shared = Arc::new(Shared {
        failures: Mutex::new(Failures::new(
            cfg.failures_per_minute,
            Duration::from_secs(60),
        )),
        client: Client::builder(TokioExecutor::new()).build(upstream_connector()),
        keys: keys_rx,
        cookie: cookie_name(&cfg.stack, cfg.sidecar.as_deref()),
        redeemed: Mutex::new(Redeemed::open(cfg.spent_file.clone(), &cfg.earlier_spent)),
        slots: Slots::new(cfg.slots),
        cfg,
    });
    tracing::info!(
        "gate of `{}` listening on {}, forwarding to {}",
        shared.cfg.stack,
        listener.local_addr()?,
        shared.cfg.upstream
    );
    let mut keys_tx = Some(keys_tx);
    let workers = (0..threads.max(1))
        .map(|i| {
            let listener = listener.try_clone()?;
            let (shared, mut shutdown) = (shared.clone(), shutdown.clone());
            // The first thread also follows the key and registry files.
            let follow = keys_tx.take();
            std::thread::Builder::new().name(format!("gate-{i}")).spawn(
                move || -> std::io::Result<()> {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()?;
                    rt.block_on(async move {
                        if let Some(tx) = follow {
                            let (dir, every) =
                                (shared.cfg.keys_dir.clone(), shared.cfg.reload_every);
                            let sidecar = shared.cfg.sidecar.clone();
                            let public = shared.cfg.public.clone();
                            tokio::spawn(keys::follow(dir, sidecar, public.clone(), every, tx));
                            if let (Some(acme), Some(public)) = (shared.cfg.acme.clone(), public) {
                                tokio::spawn(acme::run(acme, public));
                            }
                            if let Some(relay) = shared.cfg.relay.clone() {
                                tokio::spawn(crate::relay::agent::run(
                                    relay,
                                    relayed(shared.clone()),
                                ));
                            }
                        }
                        let listener = TcpListener::from_std(listener)?;
                        accept(&listener, shared, async move {
                            let _ = shutdown.wait_for(|stop| *stop).await;
                        })
                        .await
                    })
                },
            )
        })
        .collect::<std::io::Result<Vec<_>>>()?;
    for w in workers {
        w.join()
            .map_err(|_| std::io::Error::other("a gate thread panicked"))??;
    }
    Ok(())
}

/// Accepts connections on this thread until `shutdown` resolves: one when there is room for
/// it (a free slot, or an unproven connection to evict), each given its slot or closed.
pub(super) async fn accept(
    listener: &TcpListener,
    shared: Arc<Shared>,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    tokio::pin!(shutdown);
    let mut refusals = crate::quiet::Quiet::new(Duration::from_secs(10));
    loop {
        tokio::select! {
            () = shared.slots.room() => {}
            _ = &mut shutdown => return Ok(()),
        }
        let (stream, peer) = tokio::select! {
            accepted = crate::accept::next(listener, "gate") => accepted,
            _ = &mut shutdown => return Ok(()),
        };
        let slot = match shared.slots.acquire(Some(peer.ip())).await {
            Ok(slot) => slot,
            Err(why) => {
                if let Some(held_back) = refusals.say(peer.ip()) {
                    tracing::warn!(source = %peer.ip(), "closed a connection: {why}{held_back}");
                }
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(held(stream, peer, shared.clone(), slot));
    }
}

/// Serves one connection in its slot, and closes it when the slot says it must go.
pub(super) async fn held(stream: TcpStream, peer: SocketAddr, shared: Arc<Shared>, slot: Slot) {
    let slot = Arc::new(slot);
    let within = shared.cfg.header_timeout;
    tokio::select! {
        () = connection(stream, peer, shared, slot.clone()) => {}
        why = slot.must_close(within) => {
            tracing::debug!(source = %peer, "closed a connection that presented no credential: {why:?}");
        }
    }
}

/// What the relay agent does with a data channel a device has spoken on: serve it like a
/// connection accepted here (a slot, TLS or plain by its first byte), its peer the relay.
pub(super) fn relayed(shared: Arc<Shared>) -> impl Fn(TcpStream) + Clone + Send + 'static {
    move |stream: TcpStream| {
        let Ok(peer) = stream.peer_addr() else { return };
        let shared = shared.clone();
        tokio::spawn(async move {
            // The relay's own address is every relayed device's: not counted per source.
            if let Ok(slot) = shared.slots.acquire(None).await {
                held(stream, peer, shared, slot).await;
            }
        });
    }
}

/// Connections to the app: small requests go out at once (no Nagle delay).
pub(super) fn upstream_connector() -> HttpConnector {
    let mut c = HttpConnector::new();
    c.set_nodelay(true);
    c
}

/// One client connection. Its first byte tells TLS (a handshake record, 0x16) from plain HTTP
/// on the one gate port; plain HTTP is refused when the stack says `gate tls-only=#true`.
pub(super) async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    slot: Arc<Slot>,
) {
    // A client that connects and sends nothing holds a connection slot: it gets as long as
    // a request's headers would (hyper's header timer only starts at the first byte).
    let mut first = [0u8; 1];
    match tokio::time::timeout(shared.cfg.header_timeout, stream.peek(&mut first)).await {
        Ok(Ok(n)) if n > 0 => {}
        _ => {
            tracing::debug!(source = %peer, "closed a connection that sent nothing");
            return;
        }
    }
    if first[0] != TLS_HANDSHAKE {
        if shared.cfg.tls_only {
            tls::refuse_plain(stream, peer, HEALTH_PATH).await;
        } else {
            serve_http(stream, peer, false, shared, slot).await;
        }
        return;
    }
    let identity = shared.keys.borrow().as_ref().and_then(|k| k.tls.clone());
    let Some(identity) = identity else {
        tracing::info!(source = %peer, "refused a TLS handshake: this gate has no certificate yet (run `soul apply`)");
        return;
    };
    let handshake = tokio_rustls::TlsAcceptor::from(identity.config).accept(stream);
    match tokio::time::timeout(shared.cfg.header_timeout, handshake).await {
        // The CA's TLS-ALPN-01 validation ends with the handshake (RFC 8737 §3).
        Ok(Ok(stream)) if stream.get_ref().1.alpn_protocol() == Some(acme::ACME_TLS_ALPN) => {
            tracing::info!(source = %peer, "answered an ACME tls-alpn-01 validation");
        }
        Ok(Ok(stream)) => serve_http(stream, peer, true, shared, slot).await,
        Ok(Err(e)) => tracing::debug!(source = %peer, "TLS handshake failed: {e}"),
        Err(_) => tracing::debug!(source = %peer, "TLS handshake timed out"),
    }
}

/// A TLS record's first byte when it carries a handshake (a ClientHello, first of all).
pub(super) const TLS_HANDSHAKE: u8 = 0x16;

/// HTTP/1.1 or HTTP/2 on one connection, plain or TLS: served until it ends, or until a device
/// it authenticated as is revoked (then it is closed, WebSockets included). The fast
/// [`lane`] serves it while its requests are the lane's; the full server serves the rest.
pub(super) async fn serve_http<I>(
    mut io: I,
    peer: SocketAddr,
    tls: bool,
    shared: Arc<Shared>,
    slot: Arc<Slot>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let client = Arc::new(ClientConnection {
        peer,
        tls,
        forwarded_for: forward::client_address(peer.ip()),
        held: Arc::default(),
        app: AppConnection::default(),
        slot,
    });
    let held = client.held.clone();
    let shared_here = shared.clone();
    let served = async move {
        let admits = |shown: lane::Shown<'_>| super::authorize(&shared, &client, shown);
        let door = lane::Door {
            max_header_bytes: shared.cfg.max_header_bytes,
            max_headers: shared.cfg.max_headers,
            header_timeout: shared.cfg.header_timeout,
            cookie: &shared.cookie,
            upstream: shared.cfg.upstream,
            peer,
            tls,
            forwarded_for: client.forwarded_for.as_bytes(),
            admits: &admits,
        };
        match lane::serve(&mut io, &door).await {
            lane::Outcome::Closed => {
                let _ = tokio::io::AsyncWriteExt::shutdown(&mut io).await;
            }
            lane::Outcome::HandOver(read) => {
                serve_hyper(crate::rewind::Rewind::new(read, io), client, shared.clone()).await;
            }
        }
    };
    // The requests are served by a task of their own, so that their wake-ups poll only them;
    // this one wakes when the serving ends or a credential it showed is revoked (then the
    // serving task is aborted, its connection closed, with it).
    let serving = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(served));
    tokio::select! {
        _ = serving => {}
        device = revoked(&shared_here, held) => {
            tracing::info!(source = %peer, device = %device, "closing the connection of a revoked device");
        }
    }
}

/// The full server (hyper): every request, HTTP/1.1 and HTTP/2, pairing and refusals included.
pub(super) async fn serve_hyper<I>(io: I, client: Arc<ClientConnection>, shared: Arc<Shared>)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let peer = client.peer;
    let svc = {
        let shared = shared.clone();
        hyper::service::service_fn(move |req| {
            let (shared, client) = (shared.clone(), client.clone());
            async move { Ok::<_, Infallible>(handle(req, &shared, &client).await) }
        })
    };
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(shared.cfg.header_timeout)
        .max_buf_size(shared.cfg.max_header_bytes.max(8192))
        .max_headers(shared.cfg.max_headers);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(shared.cfg.max_header_bytes as u32)
        .max_concurrent_streams(H2_MAX_STREAMS)
        // A peer that stops answering pings is gone: free its slot.
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    if let Err(e) = builder
        .serve_connection_with_upgrades(TokioIo::new(io), svc)
        .await
    {
        tracing::debug!(source = %peer, "connection ended: {e}");
    }
}
