//! Where everything lives in a state dir: the one place that spells its paths, for the
//! artifacts soul writes, the gate that reads its part, the transports that mount theirs and
//! the commands that show them. Paths are relative to the state dir.

/// The stack signing key.
pub const KEY_FILE: &str = "stack.key";
/// The device registry.
pub const REGISTRY_FILE: &str = "devices.json";
/// While a new stack key is being switched in: hex of its public key. Written before the key,
/// removed by the pass after the gate's files are all written, so an apply cut short between
/// the two finishes the rotation instead of taking the new key for a stranger's.
pub const ROTATION_FILE: &str = "rotating";
/// The overlay addresses last read from the pods.
pub const ADDRESSES_FILE: &str = "addresses.json";
/// Which source each rendered file (QR PNG/SVG/text) was rendered from, so a converged pass
/// need not render anything to know the files are right.
pub const RENDER_INDEX_FILE: &str = "renders.json";
/// A random name for this state dir, made with it: a state dir deleted and made anew gets
/// another, so containers that bind-mount the old one (the gate) are recreated.
pub const STATE_ID_FILE: &str = "state.id";
/// What `soul watch` is doing, for `soul status`.
pub const WATCH_STATUS_FILE: &str = "watch.json";
/// The last stack.kdl that validated, which a watch keeps running while the file is invalid.
pub const LAST_GOOD_FILE: &str = "last-good.kdl";

/// The gate's directory, mounted read-only into every pod's gate as its `--keys` directory.
pub const GATE_DIR: &str = "gate";
/// In [`GATE_DIR`]: hex of the stack's Ed25519 public key.
pub const GATE_PUBLIC_KEY_FILE: &str = "public.key";
/// In [`GATE_DIR`]: a copy of the device registry.
pub const GATE_REGISTRY_FILE: &str = "devices.json";
/// In [`GATE_DIR`]: hex of the key that signs pairing tickets and browser sessions
/// ([`super::StackKey::link_key`]).
pub const GATE_LINK_KEY_FILE: &str = "link.key";

/// In [`GATE_DIR`]: hex of the seed of the stack's relay agent key
/// ([`super::StackKey::relay_agent_seed`]), present when the stack has a `relay`.
pub const GATE_RELAY_KEY_FILE: &str = "relay-agent.key";

/// The pairing tickets each sidecar's gate has spent (`spent/<sidecar>`, hashes only), written
/// by the gates through a read-write mount: kept whatever is removed of the pods and their
/// volumes, so a spent ticket stays spent while its device's generation is unchanged.
pub const SPENT_DIR: &str = "spent";

/// The public names' ACME accounts, certificates and keys (`acme/<sidecar>`), written by the
/// gates through a read-write mount: they live at home, never on the relay.
pub const ACME_DIR: &str = "acme";

/// The sidecars stopped on purpose (`soul stop`), a JSON list; absent when none is.
pub const STOPPED_FILE: &str = "stopped.json";

/// The images soul pulled for the stack ([`super::pulled`]), a JSON list; absent when none.
pub const PULLED_FILE: &str = "pulled.json";

/// Directories whose files soul owns entirely: anything there that is not desired goes.
pub const MANAGED_DIRS: &[&str] = &["tokens", "pairing", "transports", GATE_DIR];

/// A file in the gate's directory.
pub fn gate_file(name: &str) -> String {
    format!("{GATE_DIR}/{name}")
}

/// `sidecar`'s gate certificate (PEM), inside [`GATE_DIR`].
pub fn gate_tls_cert(sidecar: &str) -> String {
    format!("tls-{sidecar}.crt")
}

/// `sidecar`'s current addresses (`{"addresses":["lan:…",…]}`, as in its pairing codes),
/// inside [`GATE_DIR`]: what its gate tells a paired client at `/.soul/addresses`.
pub fn gate_addresses(sidecar: &str) -> String {
    format!("addresses-{sidecar}.json")
}

/// `sidecar`'s gate TLS key (PEM, PKCS#8), inside [`GATE_DIR`].
pub fn gate_tls_key(sidecar: &str) -> String {
    format!("tls-{sidecar}.key")
}

/// A device's token as its gates hold it, to hand to a client that redeems the device's pairing
/// ticket, inside [`GATE_DIR`].
pub fn gate_device_token(device: &str) -> String {
    format!("tokens/{device}.jwt")
}

/// A device's token.
pub fn token(device: &str) -> String {
    format!("tokens/{device}.jwt")
}

/// A device's pairing artifacts for one sidecar, without the extension (`.uri`, `.png`, …).
pub fn pairing(device: &str, sidecar: &str) -> String {
    format!("pairing/{device}/{sidecar}")
}

/// A file or directory a transport writes for one sidecar's pod (its config).
pub fn transport(sidecar: &str, name: &str) -> String {
    format!("transports/{sidecar}/{name}")
}
