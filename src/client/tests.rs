//! The client against real sockets on loopback: path choice (RFC 8305 timing, the pin) and a
//! whole session through an in-process relay and agent.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

use super::race::{self, STAGGER};
use super::*;
use crate::stack::TransportKind;
use crate::state::StackKey;

fn identity(seed: u8) -> crate::tls::Identity {
    crate::tls::identity(&StackKey::from_seed(1, [seed; 32]), "home", "notes")
}

/// A TLS "gate" with `identity` that answers `ok` to anything; counts the application bytes
/// it ever read.
struct FakeGate {
    addr: SocketAddr,
    bytes_read: Arc<AtomicUsize>,
    handshakes: Arc<AtomicUsize>,
}

async fn fake_gate(identity: &crate::tls::Identity) -> FakeGate {
    let tls = crate::gate::GateTls::from_pem(
        identity.cert_pem.as_bytes(),
        identity.key_pem.as_bytes(),
        None,
    )
    .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (bytes_read, handshakes) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (read, shaken) = (bytes_read.clone(), handshakes.clone());
    tokio::spawn(async move {
        loop {
            let (s, _) = listener.accept().await.unwrap();
            serve_tls(s, tls.config.clone(), read.clone(), shaken.clone());
        }
    });
    FakeGate {
        addr,
        bytes_read,
        handshakes,
    }
}

fn serve_tls(
    s: TcpStream,
    config: Arc<rustls::ServerConfig>,
    read: Arc<AtomicUsize>,
    shaken: Arc<AtomicUsize>,
) {
    tokio::spawn(async move {
        let Ok(mut tls) = tokio_rustls::TlsAcceptor::from(config).accept(s).await else {
            return;
        };
        shaken.fetch_add(1, Ordering::SeqCst);
        let mut buf = [0u8; 1024];
        while let Ok(n) = tls.read(&mut buf).await {
            if n == 0 {
                return;
            }
            read.fetch_add(n, Ordering::SeqCst);
            let _ = tls.write_all(b"ok").await;
        }
    });
}

fn address(kind: TransportKind, addr: SocketAddr) -> Address {
    Address::new(kind, addr.ip().to_string(), addr.port())
}

/// A port nothing listens on: connecting is refused (RST).
fn refusing() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// A "captive portal" or a black hole at the TLS layer: it accepts TCP and never answers.
async fn swallowing() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            held.push(s);
        }
    });
    addr
}

fn pairing(addresses: Vec<Address>, pin: &str) -> Pairing {
    Pairing {
        stack: "home".into(),
        sidecar: "notes".into(),
        device: "laptop".into(),
        addresses,
        pin: pin.into(),
        token: Secret::new("eyJ.not-a-real-token"),
    }
}

/// Races a LAN address and a relay address that answers with the pinned key.
async fn race_lan_then(lan: SocketAddr, id: &crate::tls::Identity) -> race::Won {
    let relay = fake_gate(id).await;
    let p = pairing(
        vec![
            address(TransportKind::Lan, lan),
            address(TransportKind::Relay, relay.addr),
        ],
        &id.pin,
    );
    match race::race(&p.addresses, &p.target(), STAGGER).await {
        Ok(won) => won,
        Err(failed) => panic!("no path won: {failed:?}"),
    }
}

#[tokio::test]
async fn the_first_path_wins_when_it_answers() {
    let id = identity(7);
    let lan = fake_gate(&id).await;
    let won = race_lan_then(lan.addr, &id).await;
    assert_eq!(won.index, 0);
    assert!(won.elapsed < STAGGER, "{:?}", won.elapsed);
}

#[tokio::test]
async fn a_refusing_lan_falls_back_at_once_not_after_the_stagger() {
    let won = race_lan_then(refusing(), &identity(7)).await;
    assert_eq!(won.index, 1);
    assert!(
        won.elapsed < STAGGER,
        "a refused attempt starts the next at once: {:?}",
        won.elapsed
    );
}

#[tokio::test]
async fn a_black_holed_lan_falls_back_after_one_stagger() {
    let won = race_lan_then(swallowing().await, &identity(7)).await;
    assert_eq!(won.index, 1, "a TCP accept alone does not win");
    assert!(
        won.elapsed >= STAGGER && won.elapsed < STAGGER * 4,
        "the next attempt starts one stagger later: {:?}",
        won.elapsed
    );
}

#[tokio::test]
async fn a_gate_with_another_key_is_refused_and_sent_nothing() {
    let (served, pinned) = (identity(7), identity(8));
    let gate = fake_gate(&served).await;
    let p = pairing(vec![address(TransportKind::Lan, gate.addr)], &pinned.pin);
    let failures = match race::race(&p.addresses, &p.target(), STAGGER).await {
        Ok(_) => panic!("a gate with another key won"),
        Err(f) => f,
    };
    assert_eq!(failures.len(), 1);
    assert!(failures[0].why.contains("TLS"), "{:?}", failures[0].why);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(gate.handshakes.load(Ordering::SeqCst), 0);
    assert_eq!(
        gate.bytes_read.load(Ordering::SeqCst),
        0,
        "not a byte of HTTP"
    );
}

/// The whole relay tier in one process: `soul relay`'s server, a pod's agent handing data
/// channels to a TLS gate, and the client choosing the relay because the LAN refuses.
#[tokio::test]
async fn a_device_reaches_the_gate_through_the_relay_when_the_lan_refuses() {
    use crate::relay::{agent, config, server, wire};
    let id = identity(7);
    let stack_key = StackKey::from_seed(1, [9; 32]);
    let agent_key = wire::AgentKey::from_seed(stack_key.relay_agent_seed());
    let mut allow = std::collections::BTreeMap::new();
    allow.insert(
        "home".to_string(),
        wire::parse_public(&agent_key.public()).unwrap(),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay_addr = listener.local_addr().unwrap();
    let relay_identity = crate::tls::relay_identity(&[5; 32]);
    let relay = server::Relay::new(
        config::RelayConfig {
            listen: relay_addr,
            status: None,
            allow,
            names: Default::default(),
            domain: None,
            limits: config::Limits::default(),
        },
        &relay_identity,
    );
    tokio::spawn(relay.clone().serve(listener, std::future::pending()));

    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("relay-agent.key");
    std::fs::write(&key_file, hex::encode(stack_key.relay_agent_seed())).unwrap();
    let tls = crate::gate::GateTls::from_pem(id.cert_pem.as_bytes(), id.key_pem.as_bytes(), None)
        .unwrap()
        .config;
    let (read, shaken) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let deliver = {
        let (read, shaken) = (read.clone(), shaken.clone());
        move |s: TcpStream| serve_tls(s, tls.clone(), read.clone(), shaken.clone())
    };
    let cfg = agent::AgentConfig {
        relay: relay_addr.to_string(),
        pin: relay_identity.pin.clone(),
        stack: "home".into(),
        sidecar: "notes".into(),
        key_file,
        state_file: Some(dir.path().join(agent::STATE_FILE)),
        public: None,
    };
    let agent_task = tokio::spawn(agent::run(cfg, deliver));
    // Registered, with its ready pool open, and the state file says so.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while relay
        .status()
        .stacks
        .first()
        .and_then(|s| s.sidecars.first())
        .is_none_or(|c| c.ready < 4)
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the agent never registered"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        std::fs::read_to_string(dir.path().join(agent::STATE_FILE))
            .unwrap()
            .trim(),
        "127.0.0.1"
    );

    let p = pairing(
        vec![
            address(TransportKind::Lan, refusing()),
            address(TransportKind::Relay, relay_addr),
        ],
        &id.pin,
    );
    let connector = Connector::new(p);
    let mut stream = connector.connect().await.unwrap();
    assert_eq!(
        connector.current().unwrap().address.transport,
        TransportKind::Relay
    );
    stream.write_all(b"hello through the relay").await.unwrap();
    let mut answer = [0u8; 2];
    stream.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"ok");
    assert_eq!(read.load(Ordering::SeqCst), 23);
    // The used channel is replaced: the pool is back to its size.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while relay.status().stacks[0].sidecars[0].ready < 4 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the pool was not refilled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // An agent that stops (its gate stopped) unregisters and says so.
    agent_task.abort();
    let _ = agent_task.await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !relay.status().stacks[0].sidecars.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the relay kept a dead registration"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A 30000×30000 PNG given to `soul connect` once took 1.77 GB for 16 s: its size is checked
/// before a pixel is decoded.
#[test]
fn a_huge_png_is_refused_before_it_is_decoded() {
    let mut bytes = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut bytes, 30_000, 30_000);
        encoder.set_color(png::ColorType::Grayscale);
        encoder.set_depth(png::BitDepth::One);
        let mut writer = encoder.write_header().unwrap();
        // A few bytes of image data: enough for a decoder to start.
        writer
            .write_chunk(png::chunk::IDAT, &[0x78, 0x9c, 0x03, 0x00])
            .unwrap();
        let _ = writer.finish();
    }
    let started = std::time::Instant::now();
    let e = crate::pairing::qr::decode_png(&bytes)
        .unwrap_err()
        .to_string();
    assert!(e.contains("30000×30000") && e.contains("crop"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(1));
}

/// docs/vectors: the conformance vectors an app author's client is tested against, and soul's
/// own reader, pin, ticket check and race with them, so that the docs and the code cannot
/// drift apart.
mod vectors {
    use super::*;
    use crate::pairing::{Payload, PayloadError};
    use serde_json::Value;

    fn load(name: &str) -> Value {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("docs/vectors")
            .join(name);
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    fn reason(e: &PayloadError) -> &'static str {
        match e {
            PayloadError::NotACode => "not-a-code",
            PayloadError::Version(_) => "version",
            PayloadError::Missing(_) => "missing",
            PayloadError::Repeated { .. } => "repeated",
            PayloadError::Address(_) => "address",
            PayloadError::Pin(_) => "pin",
            PayloadError::Name { .. } => "name",
        }
    }

    #[test]
    fn codes() {
        let v = load("codes.json");
        for case in v["valid"].as_array().unwrap() {
            let code = case["code"].as_str().unwrap();
            let p = Payload::parse(code).unwrap_or_else(|e| panic!("{}: {e}", case["name"]));
            let addresses: Vec<String> = p.addresses.iter().map(ToString::to_string).collect();
            let got = serde_json::json!({
                "stack": p.stack, "sidecar": p.sidecar, "device": p.device,
                "addresses": addresses, "pin": p.pin,
                "token": p.token.as_ref().map(|t| t.expose().to_string()),
                "ticket": p.ticket.as_ref().map(|t| t.expose().to_string()),
            });
            for field in [
                "stack",
                "sidecar",
                "device",
                "addresses",
                "pin",
                "token",
                "ticket",
            ] {
                assert_eq!(got[field], case[field], "{}: {field}", case["name"]);
            }
        }
        for case in v["invalid"].as_array().unwrap() {
            let code = case["code"].as_str().unwrap();
            match Payload::parse(code) {
                Ok(p) => panic!("{code} was read: {p:?}"),
                Err(e) => assert_eq!(reason(&e), case["reason"], "{code}: {e}"),
            }
        }
    }

    #[test]
    fn pins() {
        use rustls::pki_types::pem::PemObject as _;
        for case in load("pins.json")["certificates"].as_array().unwrap() {
            let der = rustls::pki_types::CertificateDer::from_pem_slice(
                case["pem"].as_str().unwrap().as_bytes(),
            )
            .unwrap();
            assert_eq!(
                crate::pin::pin_of_certificate(&der).as_deref(),
                case["pin"].as_str(),
                "{}",
                case["name"]
            );
        }
    }

    #[test]
    fn tickets() {
        let v = load("tickets.json");
        let key: [u8; 32] = hex::decode(v["link_key"].as_str().unwrap())
            .unwrap()
            .try_into()
            .unwrap();
        let registry = crate::state::Registry {
            devices: serde_json::from_value(v["registry"].clone()).unwrap(),
        };
        let (stack, sidecar) = (v["stack"].as_str().unwrap(), v["sidecar"].as_str().unwrap());
        for case in v["cases"].as_array().unwrap() {
            let ticket = case["ticket"].as_str().unwrap();
            let now = case["now"].as_u64().or(v["now"].as_u64()).unwrap();
            let got =
                match crate::pairing::verify_ticket(ticket, &key, stack, sidecar, &registry, now) {
                    Ok(t) => {
                        assert_eq!(t.issued, ticket, "a valid ticket has one spelling");
                        "valid"
                    }
                    Err(e) => e.code(),
                };
            assert_eq!(got, case["expect"], "{ticket}");
        }
    }

    #[tokio::test]
    async fn race() {
        let v = load("race.json");
        let stagger = Duration::from_millis(v["stagger_ms"].as_u64().unwrap());
        assert_eq!(stagger, STAGGER, "the documented stagger is soul's");
        let (id, other) = (identity(61), identity(62));
        for case in v["cases"].as_array().unwrap() {
            let mut addresses = Vec::new();
            for outcome in case["addresses"].as_array().unwrap() {
                let addr = match outcome.as_str().unwrap() {
                    "answers" => fake_gate(&id).await.addr,
                    "wrong-key" => fake_gate(&other).await.addr,
                    "refuses" => refusing(),
                    "black-hole" => swallowing().await,
                    o => panic!("unknown outcome {o}"),
                };
                addresses.push(address(TransportKind::Lan, addr));
            }
            let p = pairing(addresses, &id.pin);
            let result = race::race(&p.addresses, &p.target(), stagger).await;
            match (result, case["winner"].as_u64()) {
                (Ok(won), Some(winner)) => {
                    assert_eq!(won.index as u64, winner, "{}", case["name"]);
                    let at_least = Duration::from_millis(case["at_least_ms"].as_u64().unwrap());
                    assert!(
                        won.elapsed >= at_least,
                        "{}: won after {:?}",
                        case["name"],
                        won.elapsed
                    );
                }
                (Err(failed), None) => {
                    assert_eq!(failed.len(), p.addresses.len(), "{}", case["name"]);
                }
                (Ok(won), None) => panic!("{}: {} won", case["name"], won.index),
                (Err(failed), Some(_)) => panic!("{}: {failed:?}", case["name"]),
            }
        }
    }
}
