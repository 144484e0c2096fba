//! The relay protocol between a pod's agent and `soul relay`, version 2. Everything travels on
//! the relay's one port. A device's connection starts with a TLS ClientHello naming
//! `<sidecar>.<stack>.soul` (the relay routes it, never terminating it); an agent's control
//! channel is TLS too, naming [`AGENT_SERVER_NAME`], and the relay terminates that one with
//! its own key, which the agent pins (stack.kdl's `relay … pin=`): an agent never sends a
//! byte to a relay whose key does not match. Inside, [`MAGIC`] and then frames: a 2-byte
//! big-endian length and that many bytes of JSON, never more than [`MAX_FRAME`].
//!
//! - **Control** (one per registered sidecar): the agent sends [`Hello::Control`] with its
//!   public key; the relay answers [`ToAgent::Challenge`]; the agent signs
//!   [`registration_message`], which binds the nonce to this very TLS session (an exporter
//!   value, RFC 5705 / RFC 8446 §7.5, under [`EXPORTER_LABEL`]), so a relay in the middle
//!   cannot replay it to the real one; it sends [`FromAgent::Signature`]; the relay answers
//!   [`ToAgent::Registered`] with a fresh channel key or [`ToAgent::Refused`] and closes.
//!   Afterwards the relay sends [`ToAgent::Open`] when a device waits and no data channel is
//!   ready, and [`ToAgent::Ping`]; the agent answers pings with [`FromAgent::Pong`].
//! - **Data** (the ready pool): plain TCP that starts with [`DATA_MARKER`] and the channel's
//!   id, [`channel_id`]: an HMAC under the channel key of the channel's sequence number. The
//!   relay takes each id once; the key itself only ever crossed inside the control channel's
//!   TLS, so a capture of a data channel names no registration and cannot open another. Then
//!   the agent waits: the first bytes to arrive are a device's ClientHello, and from then on
//!   the relay splices the device's bytes both ways (the device's TLS ends at the gate,
//!   pinned).
//!
//! The relay only ever learns public keys and the channel keys it made itself.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// What an agent's control channel starts with, inside its TLS.
pub const MAGIC: &[u8; 13] = b"soul-relay/2\n";
/// What an agent of version 1 sent in clear: the relay tells it to upgrade.
pub const MAGIC_V1: &[u8; 13] = b"soul-relay/1\n";
pub use crate::proto::AGENT_SERVER_NAME;
/// The first byte of a data channel (neither a TLS record nor either magic).
pub const DATA_MARKER: u8 = 0x01;
/// Bytes of a data channel's id.
pub const CHANNEL_ID: usize = 16;
/// The exporter label that binds a registration to its TLS session.
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-soul-relay-registration";
/// The largest frame either side sends or accepts.
pub const MAX_FRAME: usize = 4096;
/// Domain separation for the registration signature.
const SIGNED_LABEL: &[u8] = b"soul-relay/2 register";
/// Domain separation for data channel ids.
const CHANNEL_LABEL: &[u8] = b"soul-relay/2 data channel";

/// The first frame of an agent's connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "hello", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Hello {
    /// Registers `sidecar` of `stack` under the agent key `key` ([`AgentKey::public`]).
    Control {
        stack: String,
        sidecar: String,
        key: String,
        /// The public name the sidecar claims (`<label>.<relay's domain>`), if it has one: the
        /// relay routes ClientHellos naming it here too, still without terminating them.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        public: Option<String>,
    },
}

/// What the relay sends an agent's control channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub enum ToAgent {
    /// Sign this (base64 of 32 random bytes) to prove the key.
    Challenge { nonce: String },
    /// Registered: open data channels with ids under this channel key (base64 of 32 random
    /// bytes); keep `ready` of them open.
    Registered {
        channel_key: String,
        ready: usize,
        /// Why the public name the agent claimed is not routed here (the registration of its
        /// `.soul` name stands).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        public_refused: Option<String>,
        /// The address of the registration this one replaced, which was told so
        /// ([`ToAgent::Replaced`]): another machine serving this stack, or this one before a
        /// network break the relay had not noticed yet.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        replaced: Option<String>,
    },
    /// Not registered, and why (the agent logs it and backs off).
    Refused { reason: String },
    /// Devices are waiting and no data channel is ready: open `count` more.
    Open { count: usize },
    /// Are you there? (answered by [`FromAgent::Pong`]).
    Ping,
    /// A newer registration of this sidecar (the same stack key, from `by`: another machine,
    /// or this one after a restart) replaced this one; the relay keeps the newest. The control
    /// channel ends after this.
    Replaced { by: String },
}

/// What an agent sends on its control channel after its hello.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub enum FromAgent {
    /// Base64 of the Ed25519 signature over [`registration_message`].
    Signature {
        signature: String,
    },
    Pong,
}

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("a frame of {0} bytes is larger than {MAX_FRAME}")]
    TooLarge(usize),
    #[error("not a soul relay message: {0}")]
    Malformed(#[from] serde_json::Error),
}

/// Writes one frame.
pub async fn write_frame<W, T>(out: &mut W, message: &T) -> std::io::Result<()>
where
    W: AsyncWrite + Unpin,
    T: Serialize,
{
    let json = serde_json::to_vec(message).map_err(std::io::Error::other)?;
    if json.len() > MAX_FRAME {
        return Err(std::io::Error::other(FrameError::TooLarge(json.len())));
    }
    let mut frame = Vec::with_capacity(2 + json.len());
    frame.extend_from_slice(&(json.len() as u16).to_be_bytes());
    frame.extend_from_slice(&json);
    out.write_all(&frame).await
}

/// Reads one frame, exactly: no byte after it is consumed. (Not tokio-util's
/// `LengthDelimitedCodec`, which buffers what follows: the relay reads an agent's hello and
/// hands the stream on to the registration, and nothing read past the hello may be lost.)
pub async fn read_frame<R, T>(input: &mut R) -> Result<T, FrameError>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    let mut len = [0u8; 2];
    input.read_exact(&mut len).await?;
    let len = usize::from(u16::from_be_bytes(len));
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    let mut json = vec![0u8; len];
    input.read_exact(&mut json).await?;
    Ok(serde_json::from_slice(&json)?)
}

/// What the agent signs to register `sidecar` of `stack`, answering `nonce` on the TLS session
/// whose exporter value is `session`.
pub fn registration_message(stack: &str, sidecar: &str, nonce: &[u8], session: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(SIGNED_LABEL.len() + stack.len() + sidecar.len() + 70);
    for part in [
        SIGNED_LABEL,
        stack.as_bytes(),
        sidecar.as_bytes(),
        nonce,
        session,
    ] {
        m.extend_from_slice(part);
        m.push(0);
    }
    m
}

pub use crate::proto::{route_of, server_name};

/// An agent's Ed25519 key: one per stack, derived from the stack key (so it rotates with it),
/// held by the stack's gates. The relay knows only [`AgentKey::public`], from its allow-list.
pub struct AgentKey(ed25519_dalek::SigningKey);

impl AgentKey {
    pub fn from_seed(seed: [u8; 32]) -> AgentKey {
        AgentKey(ed25519_dalek::SigningKey::from_bytes(&seed))
    }

    /// The key file's text: hex of the seed (the gate's `relay-agent.key`).
    pub fn parse(file: &str) -> Option<AgentKey> {
        let seed: [u8; 32] = hex::decode(file.trim()).ok()?.try_into().ok()?;
        Some(AgentKey::from_seed(seed))
    }

    /// `ed25519:<base64>`: what the relay's allow-list holds.
    pub fn public(&self) -> String {
        public_text(&self.0.verifying_key().to_bytes())
    }

    /// The signature that registers `sidecar` of `stack` against `nonce` on the TLS session
    /// whose exporter value is `session`, in base64.
    pub fn sign(&self, stack: &str, sidecar: &str, nonce: &[u8], session: &[u8]) -> String {
        use ed25519_dalek::Signer as _;
        B64.encode(
            self.0
                .sign(&registration_message(stack, sidecar, nonce, session))
                .to_bytes(),
        )
    }
}

impl std::fmt::Debug for AgentKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AgentKey({})", self.public())
    }
}

/// `ed25519:<base64>` of a raw public key.
pub fn public_text(key: &[u8; 32]) -> String {
    format!("ed25519:{}", B64.encode(key))
}

/// The raw key of `ed25519:<base64>`.
pub fn parse_public(text: &str) -> Option<ed25519_dalek::VerifyingKey> {
    let bytes: [u8; 32] = B64
        .decode(text.strip_prefix("ed25519:")?)
        .ok()?
        .try_into()
        .ok()?;
    ed25519_dalek::VerifyingKey::from_bytes(&bytes).ok()
}

/// Whether `signature` (base64) is `key`'s over the registration of `sidecar` of `stack`
/// against `nonce` on the session `session`. Strict verification: no malleable or small-order
/// signatures.
pub fn verify(
    key: &ed25519_dalek::VerifyingKey,
    stack: &str,
    sidecar: &str,
    nonce: &[u8],
    session: &[u8],
    signature: &str,
) -> bool {
    let Some(bytes) = B64
        .decode(signature)
        .ok()
        .and_then(|b| <[u8; 64]>::try_from(b).ok())
    else {
        return false;
    };
    let signature = ed25519_dalek::Signature::from_bytes(&bytes);
    key.verify_strict(
        &registration_message(stack, sidecar, nonce, session),
        &signature,
    )
    .is_ok()
}

/// The id of data channel number `seq` of the registration whose channel key is `key`.
pub fn channel_id(key: &[u8; 32], seq: u64) -> [u8; CHANNEL_ID] {
    use hmac::Mac as _;
    let mut mac =
        hmac::Hmac::<sha2::Sha256>::new_from_slice(key).expect("HMAC takes a key of any length");
    mac.update(CHANNEL_LABEL);
    mac.update(&seq.to_be_bytes());
    let full: [u8; 32] = mac.finalize().into_bytes().into();
    full[..CHANNEL_ID].try_into().expect("16 of 32 bytes")
}

/// What a data channel starts with: the marker and its id.
pub fn data_hello(key: &[u8; 32], seq: u64) -> [u8; 1 + CHANNEL_ID] {
    let mut hello = [DATA_MARKER; 1 + CHANNEL_ID];
    hello[1..].copy_from_slice(&channel_id(key, seq));
    hello
}

/// The 32 bytes of a base64 channel key.
pub fn decode_key(key: &str) -> Option<[u8; 32]> {
    B64.decode(key).ok()?.try_into().ok()
}

/// The value both ends of a control channel's TLS session derive under [`EXPORTER_LABEL`].
pub fn session_binding<C>(tls: &rustls::ConnectionCommon<C>) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    tls.export_keying_material(&mut out, EXPORTER_LABEL, None)
        .ok()?;
    Some(out)
}

/// Base64 of `n` random bytes (nonces and session ids).
pub fn random_b64(n: usize) -> String {
    let mut bytes = vec![0u8; n];
    getrandom::fill(&mut bytes).expect("the operating system's random generator works");
    B64.encode(bytes)
}

/// The bytes of a base64 nonce.
pub fn decode_nonce(nonce: &str) -> Option<Vec<u8>> {
    B64.decode(nonce).ok().filter(|n| n.len() == 32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_frame_is_read_back_exactly_and_leaves_what_follows() {
        let mut buf = Vec::new();
        write_frame(&mut buf, &ToAgent::Open { count: 2 })
            .await
            .unwrap();
        buf.extend_from_slice(b"\x16\x03\x01 the device's bytes");
        let mut input = &buf[..];
        let frame: ToAgent = read_frame(&mut input).await.unwrap();
        assert_eq!(frame, ToAgent::Open { count: 2 });
        assert_eq!(input, b"\x16\x03\x01 the device's bytes");
    }

    #[test]
    fn a_data_channels_id_is_its_keys_and_its_numbers_alone() {
        let (a, b) = ([1u8; 32], [2u8; 32]);
        assert_eq!(channel_id(&a, 7), channel_id(&a, 7));
        assert_ne!(channel_id(&a, 7), channel_id(&a, 8));
        assert_ne!(channel_id(&a, 7), channel_id(&b, 7));
        let hello = data_hello(&a, 7);
        assert_eq!(hello[0], DATA_MARKER);
        assert_ne!(hello[0], 0x16, "never taken for a TLS record");
        assert_ne!(hello[0], MAGIC[0]);
    }

    #[tokio::test]
    async fn an_oversized_or_malformed_frame_is_refused() {
        let mut input: &[u8] = &[0xff, 0xff, 0, 0];
        assert!(matches!(
            read_frame::<_, Hello>(&mut input).await,
            Err(FrameError::TooLarge(65535))
        ));
        let mut input: &[u8] = b"\x00\x02{}";
        assert!(matches!(
            read_frame::<_, Hello>(&mut input).await,
            Err(FrameError::Malformed(_))
        ));
    }

    #[test]
    fn a_signature_registers_only_the_stack_and_sidecar_it_was_made_for() {
        let key = AgentKey::from_seed([3; 32]);
        let public = parse_public(&key.public()).unwrap();
        let (nonce, session) = ([9u8; 32], [6u8; 32]);
        let sig = key.sign("home", "notes", &nonce, &session);
        assert!(verify(&public, "home", "notes", &nonce, &session, &sig));
        assert!(!verify(&public, "home", "photos", &nonce, &session, &sig));
        assert!(!verify(&public, "work", "notes", &nonce, &session, &sig));
        assert!(!verify(
            &public, "home", "notes", &[8u8; 32], &session, &sig
        ));
        // Another TLS session (a relay in the middle replaying it): refused.
        assert!(!verify(&public, "home", "notes", &nonce, &[5u8; 32], &sig));
        // "ho" + "menotes" must not sign the same bytes as "home" + "notes".
        assert!(!verify(&public, "ho", "menotes", &nonce, &session, &sig));
        let other = parse_public(&AgentKey::from_seed([4; 32]).public()).unwrap();
        assert!(!verify(&other, "home", "notes", &nonce, &session, &sig));
        assert!(!verify(
            &public,
            "home",
            "notes",
            &nonce,
            &session,
            "not base64"
        ));
    }

    #[test]
    fn a_server_name_routes_back_to_its_stack_and_sidecar() {
        let name = server_name("home", "notes");
        assert_eq!(name, "notes.home.soul");
        assert_eq!(route_of(&name), Some(("home", "notes")));
        assert_eq!(route_of("notes.home.example"), None);
        assert_eq!(route_of("a.notes.home.soul"), None);
        assert_eq!(route_of(".home.soul"), None);
    }

    #[test]
    fn an_agent_key_file_parses_to_the_same_public_key() {
        let key = AgentKey::from_seed([5; 32]);
        let again = AgentKey::parse(&format!("{}\n", hex::encode([5u8; 32]))).unwrap();
        assert_eq!(key.public(), again.public());
        assert!(AgentKey::parse("short").is_none());
        assert!(parse_public(&key.public()).is_some());
        assert!(parse_public("ed25519:AAAA").is_none());
    }
}
