//! The relay and the client's path choice, against their anchors measured in the same run
//! (run: `cargo bench --bench relay`; needs root for the black-holed path and `ip`/`iptables`).
//!
//! - **Throughput**: one stream for `SOUL_BENCH_SECONDS` (default 10) on loopback through
//!   `soul relay serve` (a process) to a pod agent (soul's library, in this process) and through
//!   rathole (server and client processes, plain TCP transport, from crates.io: `cargo install
//!   rathole --no-default-features --features server,client`, or `RATHOLE=/path`), each into the
//!   same sink. One load generator drives both: iperf3 cannot send the TLS ClientHello soul's
//!   relay routes by, so the generator sends one (a real rustls ClientHello) and then bytes, and
//!   rathole carries the same bytes. Goal: ≥ 1.0× rathole.
//! - **Requests/s** with 64 connections, each a 64-byte request echoed back, through each.
//! - **Added median latency** at a fixed 1,000 requests/s on one connection, against the sink
//!   directly.
//! - **Time to the first byte** of a new session, with the ready pool (`ready=4`) and without
//!   (`ready=0`: the relay asks the agent to open a channel).
//! - **Relay RSS** with 1,000 registered, idle sidecars (each a control and a ready channel).
//!   Goal: < 50 MB.
//! - **Path choice** with the first address black-holed (a network namespace whose firewall
//!   drops everything) and a pinned TLS gate second: soul's race against a sequential client
//!   with a 5 s connect timeout. Goal: < 300 ms.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use soul::relay::{agent, wire};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const SOUL: &str = env!("CARGO_BIN_EXE_soul");
const STACK: &str = "bench";

fn seconds() -> u64 {
    std::env::var("SOUL_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10)
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run());
}

async fn run() {
    let dir = tempfile::tempdir().unwrap();
    let rathole = rathole_binary();
    let secs = seconds();

    // Throughput, requests/s and latency, through each.
    let soul_entry = SoulRelay::start(dir.path(), 4, 1).await;
    let rathole_entry = match &rathole {
        Some(bin) => Some(Rathole::start(bin, dir.path()).await),
        None => {
            println!(
                "rathole not found (cargo install rathole --no-default-features --features server,client, or RATHOLE=…): its ratios are left out"
            );
            None
        }
    };
    let hello = client_hello(&format!("s0.{STACK}.soul"));

    let soul_bps = throughput(soul_entry.port, &hello, &soul_entry.sink, secs).await;
    println!("throughput, one stream, {secs} s:");
    println!("  soul relay  {:>8.0} MiB/s", soul_bps / 1048576.0);
    if let Some(r) = &rathole_entry {
        let bps = throughput(r.port, &hello, &r.sink, secs).await;
        println!("  rathole     {:>8.0} MiB/s", bps / 1048576.0);
        println!(
            "  ratio       {:>8.2}× rathole (goal ≥ 1.0)",
            soul_bps / bps
        );
    }

    let soul_rps = requests(soul_entry.port, &hello, secs.min(5)).await;
    println!("requests/s, 64 connections, 64-byte echo:");
    println!("  soul relay  {soul_rps:>8.0}");
    if let Some(r) = &rathole_entry {
        let rps = requests(r.port, &hello, secs.min(5)).await;
        println!("  rathole     {rps:>8.0}");
        println!("  ratio       {:>8.2}× rathole", soul_rps / rps);
    }

    let direct = latency(soul_entry.sink.echo_port, &hello).await;
    let through_soul = latency(soul_entry.port, &hello).await;
    println!("median latency at 1,000 requests/s on one connection:");
    println!("  direct      {:>8.1} µs", direct.as_secs_f64() * 1e6);
    println!(
        "  soul relay  {:>8.1} µs (adds {:.1} µs)",
        through_soul.as_secs_f64() * 1e6,
        (through_soul.as_secs_f64() - direct.as_secs_f64()) * 1e6
    );
    if let Some(r) = &rathole_entry {
        let through = latency(r.port, &hello).await;
        println!(
            "  rathole     {:>8.1} µs (adds {:.1} µs)",
            through.as_secs_f64() * 1e6,
            (through.as_secs_f64() - direct.as_secs_f64()) * 1e6
        );
    }
    drop(soul_entry);
    drop(rathole_entry);

    // Time to the first byte, with and without the ready pool.
    println!("time to the first byte of a new session (median of 200):");
    for ready in [4, 0] {
        let relay = SoulRelay::start(dir.path(), ready, 1).await;
        let ttfb = first_byte(relay.port, &hello).await;
        println!("  ready={ready}     {:>8.0} µs", ttfb.as_secs_f64() * 1e6);
    }

    // RSS with 1,000 idle registrations.
    let relay = SoulRelay::start(dir.path(), 1, 1000).await;
    let rss = rss_mib(relay.child.id());
    println!(
        "relay RSS with 1,000 registered idle sidecars (2,000 connections): {rss:.1} MiB (goal < 50)"
    );
    drop(relay);

    path_choice().await;
}

/// Bytes per second the sink received from one stream, after a second of warm-up.
async fn throughput(port: u16, hello: &[u8], sink: &Sink, secs: u64) -> f64 {
    sink.discard_next.store(true, Ordering::SeqCst);
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.set_nodelay(true).unwrap();
    s.write_all(hello).await.unwrap();
    let block = vec![0u8; 256 * 1024];
    let writer = tokio::spawn(async move {
        loop {
            if s.write_all(&block).await.is_err() {
                return;
            }
        }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (start, before) = (Instant::now(), sink.received.load(Ordering::Relaxed));
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let got = sink.received.load(Ordering::Relaxed) - before;
    writer.abort();
    got as f64 / start.elapsed().as_secs_f64()
}

/// Echoed 64-byte requests per second over 64 connections.
async fn requests(port: u16, hello: &[u8], secs: u64) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let (done, hello) = (done.clone(), hello.to_vec());
        tasks.push(tokio::spawn(async move {
            let mut s = echo_connection(port, &hello).await;
            let (req, mut resp) = ([7u8; 64], [0u8; 64]);
            while Instant::now() < deadline {
                s.write_all(&req).await.unwrap();
                s.read_exact(&mut resp).await.unwrap();
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let start = Instant::now();
    for t in tasks {
        t.await.unwrap();
    }
    done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

/// A connection whose ClientHello has come back from the echo sink.
async fn echo_connection(port: u16, hello: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.set_nodelay(true).unwrap();
    s.write_all(hello).await.unwrap();
    let mut back = vec![0u8; hello.len()];
    s.read_exact(&mut back).await.unwrap();
    s
}

/// The median round trip of a 64-byte request sent every millisecond for three seconds.
async fn latency(port: u16, hello: &[u8]) -> Duration {
    let mut s = echo_connection(port, hello).await;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    let (req, mut resp) = ([7u8; 64], [0u8; 64]);
    let mut rtts = Vec::with_capacity(3000);
    for _ in 0..3000 {
        tick.tick().await;
        let t = Instant::now();
        s.write_all(&req).await.unwrap();
        s.read_exact(&mut resp).await.unwrap();
        rtts.push(t.elapsed());
    }
    rtts.sort();
    rtts[rtts.len() / 2]
}

/// The median time from connecting to the first byte back, over 200 new sessions.
async fn first_byte(port: u16, hello: &[u8]) -> Duration {
    let mut times = Vec::new();
    for _ in 0..200 {
        let t = Instant::now();
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        s.set_nodelay(true).unwrap();
        s.write_all(hello).await.unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.unwrap();
        times.push(t.elapsed());
        // Let the agent refill its pool, as between a user's sessions.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    times.sort();
    times[times.len() / 2]
}

/// Where relayed connections end: an echo, or a counting discard for the one connection
/// after [`Sink::discard_next`]; `echo_port` serves the echo directly, for the baseline.
#[derive(Clone)]
struct Sink {
    received: Arc<AtomicU64>,
    echo_port: u16,
    discard_next: Arc<std::sync::atomic::AtomicBool>,
}

impl Sink {
    async fn new() -> Sink {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let echo_port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                tokio::spawn(echo(s));
            }
        });
        Sink {
            received: Arc::default(),
            echo_port,
            discard_next: Arc::default(),
        }
    }

    /// Serves one relayed connection.
    fn serve(&self, s: TcpStream) {
        if self.discard_next.swap(false, Ordering::SeqCst) {
            let received = self.received.clone();
            tokio::spawn(async move {
                let mut s = s;
                let mut buf = vec![0u8; 256 * 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        return;
                    }
                    received.fetch_add(n as u64, Ordering::Relaxed);
                }
            });
        } else {
            tokio::spawn(echo(s));
        }
    }
}

async fn echo(mut s: TcpStream) {
    let _ = s.set_nodelay(true);
    let (mut r, mut w) = s.split();
    let _ = tokio::io::copy(&mut r, &mut w).await;
}

/// `soul relay serve` as a process, with `sidecars` agents of this process registered.
struct SoulRelay {
    child: Child,
    port: u16,
    sink: Sink,
    agents: Vec<tokio::task::JoinHandle<()>>,
}

impl SoulRelay {
    async fn start(dir: &Path, ready: usize, sidecars: usize) -> SoulRelay {
        let key_file = dir.join("relay-agent.key");
        std::fs::write(&key_file, hex::encode([42u8; 32])).unwrap();
        let key = wire::AgentKey::from_seed([42u8; 32]);
        let (port, status) = (free_port(), free_port());
        let config = dir.join("relay.kdl");
        std::fs::write(
            &config,
            format!(
                "listen \"127.0.0.1:{port}\"\nstatus \"127.0.0.1:{status}\"\nallow \"{STACK}\" key=\"{}\"\nlimits ready={ready} sidecars-per-stack={} pending-per-source=4096 sessions-per-stack=4096 sessions-per-source=4096\n",
                key.public(),
                sidecars.max(1)
            ),
        )
        .unwrap();
        // The relay's key, made here so that its pin is known.
        let relay_state = dir.join("relay-state");
        std::fs::create_dir_all(&relay_state).unwrap();
        std::fs::write(relay_state.join("relay.key"), hex::encode([43u8; 32])).unwrap();
        let pin = soul::tls::relay_identity(&[43u8; 32]).pin;
        let child = Command::new(SOUL)
            .args(["relay", "serve", "--config"])
            .arg(&config)
            .arg("--state-dir")
            .arg(&relay_state)
            .env("SOUL_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_for_port(port).await;
        let sink = Sink::new().await;
        let agents = (0..sidecars)
            .map(|i| {
                let cfg = agent::AgentConfig {
                    relay: format!("127.0.0.1:{port}"),
                    pin: pin.clone(),
                    stack: STACK.into(),
                    sidecar: format!("s{i}"),
                    key_file: key_file.clone(),
                    state_file: None,
                    public: None,
                };
                let sink = sink.clone();
                tokio::spawn(agent::run(cfg, move |s| sink.serve(s)))
            })
            .collect();
        let relay = SoulRelay {
            child,
            port,
            sink,
            agents,
        };
        relay.await_registered(status, sidecars, ready).await;
        relay
    }

    async fn await_registered(&self, status: u16, sidecars: usize, ready: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (_, body) = soul::programs::get(
                &format!("http://127.0.0.1:{status}/status"),
                Duration::from_secs(5),
            )
            .await
            .unwrap();
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            let registered = v["stacks"][0]["sidecars"].as_array().map_or(0, |a| {
                a.iter()
                    .filter(|c| c["ready"].as_u64().unwrap_or(0) >= ready as u64)
                    .count()
            });
            if registered >= sidecars {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "only {registered} of {sidecars} registered"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for SoulRelay {
    fn drop(&mut self) {
        for a in &self.agents {
            a.abort();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// rathole's server and client, plain TCP, one service into a sink.
struct Rathole {
    children: Vec<Child>,
    port: u16,
    sink: Sink,
}

impl Rathole {
    async fn start(bin: &Path, dir: &Path) -> Rathole {
        let sink = Sink::new().await;
        // rathole forwards to a fixed local address: a listener that hands connections to
        // the sink like soul's agent does.
        let local = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let local_port = local.local_addr().unwrap().port();
        let served = sink.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = local.accept().await {
                let _ = s.set_nodelay(true);
                served.serve(s);
            }
        });
        let (control, port) = (free_port(), free_port());
        let server = dir.join("rathole-server.toml");
        std::fs::write(
            &server,
            format!("[server]\nbind_addr = \"127.0.0.1:{control}\"\n[server.services.bench]\ntoken = \"bench\"\nbind_addr = \"127.0.0.1:{port}\"\nnodelay = true\n"),
        )
        .unwrap();
        let client = dir.join("rathole-client.toml");
        std::fs::write(
            &client,
            format!("[client]\nremote_addr = \"127.0.0.1:{control}\"\n[client.services.bench]\ntoken = \"bench\"\nlocal_addr = \"127.0.0.1:{local_port}\"\nnodelay = true\n"),
        )
        .unwrap();
        let spawn = |args: &[&str], file: &Path| {
            Command::new(bin)
                .args(args)
                .arg(file)
                .env("RUST_LOG", "error")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        };
        let children = vec![spawn(&["--server"], &server), spawn(&["--client"], &client)];
        wait_for_port(port).await;
        // The client's control channel comes up a moment after the server's port.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
            s.write_all(b"x").await.unwrap();
            let mut b = [0u8; 1];
            let echoed =
                tokio::time::timeout(Duration::from_millis(500), s.read_exact(&mut b)).await;
            if matches!(echoed, Ok(Ok(_))) {
                break;
            }
            assert!(Instant::now() < deadline, "rathole never forwarded");
        }
        Rathole {
            children,
            port,
            sink,
        }
    }
}

impl Drop for Rathole {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn rathole_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("RATHOLE") {
        return Some(PathBuf::from(p));
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    [
        home.join(".cargo/bin/rathole"),
        PathBuf::from("/tmp/rathole-install/bin/rathole"),
        PathBuf::from("/usr/local/bin/rathole"),
    ]
    .into_iter()
    .find(|p| p.is_file())
}

/// A real ClientHello naming `server_name`, from rustls.
fn client_hello(server_name: &str) -> Vec<u8> {
    let cfg = soul::client::pin::client_config("sha256//unused");
    let name = rustls::pki_types::ServerName::try_from(server_name.to_string()).unwrap();
    let mut conn = rustls::ClientConnection::new(cfg, name).unwrap();
    let mut out = Vec::new();
    conn.write_tls(&mut out).unwrap();
    out
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn wait_for_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    kib / 1024.0
}

/// soul's race against a sequential client, the first address black-holed.
async fn path_choice() {
    let id = std::process::id() % 100_000;
    let ns = format!("soulbench{id}");
    let net = format!("10.{}.{}", 200 + id % 50, 250 - (id / 50) % 5);
    let script = format!(
        "ip netns add {ns}
         ip link add sb{id}h type veth peer name sb{id}n
         ip link set sb{id}n netns {ns}
         ip addr add {net}.1/30 dev sb{id}h; ip link set sb{id}h up
         ip -n {ns} addr add {net}.2/30 dev sb{id}n; ip -n {ns} link set sb{id}n up
         ip netns exec {ns} iptables -A INPUT -j DROP"
    );
    let made = Command::new("sh").args(["-ec", &script]).status();
    if !made.is_ok_and(|s| s.success()) {
        println!("path choice: skipped (needs root, ip and iptables for its network namespace)");
        let _ = Command::new("ip").args(["netns", "del", &ns]).status();
        return;
    }
    let identity = soul::tls::identity(&soul::state::StackKey::from_seed(1, [3; 32]), STACK, "s0");
    let tls = soul::gate::GateTls::from_pem(
        identity.cert_pem.as_bytes(),
        identity.key_pem.as_bytes(),
        None,
    )
    .unwrap()
    .config;
    let gate = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gate_addr: SocketAddr = gate.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = gate.accept().await {
            let tls = tls.clone();
            tokio::spawn(async move {
                if let Ok(mut t) = tokio_rustls::TlsAcceptor::from(tls).accept(s).await {
                    let mut b = [0u8; 1];
                    let _ = t.read(&mut b).await;
                }
            });
        }
    });
    use soul::pairing::Address;
    use soul::stack::TransportKind;
    let addresses = vec![
        Address::new(TransportKind::Lan, format!("{net}.2"), 443),
        Address::new(TransportKind::Relay, "127.0.0.1", gate_addr.port()),
    ];
    let pairing = soul::client::Pairing {
        stack: STACK.into(),
        sidecar: "s0".into(),
        device: "bench".into(),
        addresses: addresses.clone(),
        pin: identity.pin.clone(),
        token: soul::secret::Secret::new("unused"),
    };
    let target = pairing.target();
    let mut races = Vec::new();
    for _ in 0..5 {
        let won = soul::client::race::race(&addresses, &target, soul::client::race::STAGGER)
            .await
            .ok()
            .unwrap();
        assert_eq!(won.index, 1);
        races.push(won.elapsed);
    }
    races.sort();
    let sequential = {
        let start = Instant::now();
        for a in &addresses {
            let connect = TcpStream::connect((a.host.as_str(), a.port));
            if let Ok(Ok(tcp)) = tokio::time::timeout(Duration::from_secs(5), connect).await {
                let name = target.server_name.clone();
                let tls = tokio_rustls::TlsConnector::from(target.tls.clone());
                if tls.connect(name, tcp).await.is_ok() {
                    break;
                }
            }
        }
        start.elapsed()
    };
    let race = races[races.len() / 2];
    println!("path choice with the first address black-holed:");
    println!(
        "  soul's race        {:>8.0} ms (goal < 300)",
        race.as_secs_f64() * 1e3
    );
    println!(
        "  sequential, 5 s    {:>8.0} ms",
        sequential.as_secs_f64() * 1e3
    );
    println!(
        "  ratio              {:>8.3}× the sequential client",
        race.as_secs_f64() / sequential.as_secs_f64()
    );
    // Deleting the namespace deletes its end of the veth pair, and with it this end.
    let _ = Command::new("ip").args(["netns", "del", &ns]).status();
}
