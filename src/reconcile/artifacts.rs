//! The state dir's desired files — stack key, device registry, device tokens, pairing URIs
//! and their QR renderings — as a pure function of stack.kdl, the stored key and registry,
//! the discovered addresses and the clock.

use sha2::{Digest, Sha256};

use crate::pairing::{
    Address, CodeFields, PairingLink, PairingUri, TokenError, browser_links, claims_for, issue,
};
use crate::stack::{Stack, parse_duration};
use crate::state::{
    DeviceEntry, Issued, KEY_FILE, KeyProblem, REGISTRY_FILE, ROTATION_FILE, Registry, RenderIndex,
    StackKey, layout, unhex32,
};

use super::plan::{DesiredFile, FileContent, QrFormat};

/// What the machine's state dir holds now, plus a fresh key to use if a new one is needed.
#[derive(Debug, Clone)]
pub struct PairingInputs {
    pub key: Result<StackKey, KeyProblem>,
    pub fresh_key: StackKey,
    pub registry: Result<Registry, KeyProblem>,
    /// What the gate's copies say of tokens issued before.
    pub issued: Issued,
    pub renders: RenderIndex,
    /// Per sidecar, in stack order.
    pub addresses: Vec<Vec<Address>>,
    /// Unix seconds.
    pub now: u64,
}

/// Why the key is being replaced, if it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyChange {
    /// The stack's first key.
    First,
    /// `secret-generation` was bumped.
    Rotated { from: u64, to: u64 },
    /// The stored key is gone or unreadable and no device was paired with it.
    Replaced(String),
}

/// Why the state dir's files cannot be computed.
#[derive(Debug, thiserror::Error)]
pub enum PairingError {
    #[error(transparent)]
    Token(#[from] TokenError),
    /// The stack key is gone or unreadable while devices hold tokens it signed: a new key would
    /// lock every one of them out, so soul does not make one by itself.
    #[error("the stack key is {why}, and {devices} paired device(s) hold tokens signed with it")]
    KeyLost { why: String, devices: usize },
    /// The device registry is gone or unreadable while the gates admit devices issued from it:
    /// a new registry would re-issue every token (new issue times), locking each device out.
    #[error(
        "the device registry devices.json is {why}, and {devices} paired device(s) hold tokens issued from it"
    )]
    RegistryLost {
        why: String,
        devices: usize,
        /// The gate's copy (`gate/devices.json`) reads, under the stored key: it can be copied
        /// back.
        gate_copy: bool,
    },
    /// The stored key is a valid key, but not the one the gates verify tokens with (and no
    /// rotation to it has begun): another stack's key, or an old backup.
    #[error(
        "the stack key in stack.key is not the one the {devices} paired device(s)' tokens were signed with (gate/public.key names another)"
    )]
    KeyMismatch { devices: usize },
}

/// The desired state dir.
#[derive(Debug, Clone)]
pub struct Pairing {
    pub key: StackKey,
    pub key_change: Option<KeyChange>,
    pub registry: Registry,
    pub files: Vec<DesiredFile>,
}

/// Computes every file the state dir should hold.
pub fn desired_files(stack: &Stack, inputs: PairingInputs) -> Result<Pairing, PairingError> {
    let issued = inputs.issued.devices();
    // A lost key is the graver loss: said first when the registry is gone too.
    if let (Err(problem), true) = (&inputs.key, issued > 0) {
        return Err(PairingError::KeyLost {
            why: match problem {
                KeyProblem::Missing => "missing".into(),
                KeyProblem::Unreadable(why) => format!("unreadable ({why})"),
            },
            devices: issued,
        });
    }
    let stored = match &inputs.registry {
        Ok(r) => r.clone(),
        // Nothing was issued from it: nothing is lost by starting a new one.
        Err(_) if issued == 0 => Registry::default(),
        Err(problem) => {
            let gate_copy = inputs.issued.gate_registry.is_some()
                && matches!((&inputs.key, inputs.issued.gate_public_key),
                    (Ok(k), Some(p)) if k.public_key() == p);
            return Err(PairingError::RegistryLost {
                why: match problem {
                    KeyProblem::Missing => "missing".into(),
                    KeyProblem::Unreadable(why) => format!("unreadable ({why})"),
                },
                devices: issued,
                gate_copy,
            });
        }
    };
    let devices = stored.devices.len().max(issued);
    if let (Ok(k), Some(verified_with)) = (&inputs.key, inputs.issued.gate_public_key)
        && devices > 0
        && k.public_key() != verified_with
        && inputs.issued.rotating_to != Some(k.public_key())
    {
        return Err(PairingError::KeyMismatch { devices });
    }
    let key_change = match &inputs.key {
        Ok(k) if k.generation == stack.secret_generation => None,
        Ok(k) => Some(KeyChange::Rotated {
            from: k.generation,
            to: stack.secret_generation,
        }),
        Err(KeyProblem::Missing) if devices == 0 => Some(KeyChange::First),
        Err(KeyProblem::Unreadable(why)) if devices == 0 => Some(KeyChange::Replaced(format!(
            "the stored key is unreadable ({why})"
        ))),
        Err(KeyProblem::Missing) => {
            return Err(PairingError::KeyLost {
                why: "missing".into(),
                devices,
            });
        }
        Err(KeyProblem::Unreadable(why)) => {
            return Err(PairingError::KeyLost {
                why: format!("unreadable ({why})"),
                devices,
            });
        }
    };
    let key = match inputs.key {
        Ok(k) if key_change.is_none() => k,
        _ => inputs.fresh_key.with_generation(stack.secret_generation),
    };

    let mut registry = Registry::default();
    for d in &stack.devices {
        let issued_at = match stored.devices.get(&d.name) {
            Some(e) if e.generation == d.generation => e.issued_at,
            _ => inputs.now,
        };
        let expires_at = d
            .expires
            .as_deref()
            .and_then(parse_duration)
            .map(|ttl| issued_at.saturating_add(ttl.as_secs()));
        registry.devices.insert(
            d.name.clone(),
            DeviceEntry {
                generation: d.generation,
                issued_at,
                expires_at,
            },
        );
    }

    let key_what = match &key_change {
        None => "stack key".to_string(),
        Some(KeyChange::First) => "stack key (new)".to_string(),
        Some(KeyChange::Rotated { from, to }) => {
            format!("stack key (rotated: secret-generation {from} → {to})")
        }
        Some(KeyChange::Replaced(why)) => format!("stack key (regenerated: {why})"),
    };
    let link_key = key.link_key();
    // Two groups, written in this order: the artifacts a new key makes (tokens, codes), then
    // the switch (the key, the registry and every file the gates read). A write that fails in
    // the first group leaves the old key and gates working; one in the second is finished by
    // the next pass, which the rotation file tells from a stranger's key.
    let mut switch = Vec::new();
    if key_change.is_some() && inputs.issued.gate_public_key.is_some() {
        switch.push(DesiredFile::bytes(
            ROTATION_FILE,
            "the key being switched in".into(),
            format!("{}\n", hex::encode(key.public_key())).into_bytes(),
        ));
    }
    switch.extend([
        DesiredFile::bytes(KEY_FILE, key_what, key.to_file()),
        DesiredFile::bytes(REGISTRY_FILE, "device registry".into(), registry.to_file()),
        DesiredFile::bytes(
            &layout::gate_file(layout::GATE_REGISTRY_FILE),
            "gate's device registry".into(),
            registry.to_file(),
        ),
        // What the gates check pairing tickets and sign browser sessions with.
        DesiredFile::bytes(
            &layout::gate_file(layout::GATE_LINK_KEY_FILE),
            "gate's link key".into(),
            format!("{}\n", hex::encode(link_key)).into_bytes(),
        ),
    ]);
    let mut files = Vec::new();
    // The relay agent's key, derived from the stack key: what the relay's allow-list names.
    if stack.relay.is_some() {
        switch.push(DesiredFile::bytes(
            &layout::gate_file(layout::GATE_RELAY_KEY_FILE),
            "gate's relay agent key".into(),
            format!("{}\n", hex::encode(key.relay_agent_seed())).into_bytes(),
        ));
    }
    // Each gate's TLS certificate and key, derived from the stack key; clients pin the key.
    let mut pins = Vec::new();
    for sidecar in &stack.sidecars {
        let identity = crate::tls::identity(&key, &stack.stack, &sidecar.name);
        switch.push(DesiredFile::bytes(
            &layout::gate_file(&layout::gate_tls_cert(&sidecar.name)),
            format!("gate's TLS certificate for {}", sidecar.name),
            identity.cert_pem.into_bytes(),
        ));
        switch.push(DesiredFile::bytes(
            &layout::gate_file(&layout::gate_tls_key(&sidecar.name)),
            format!("gate's TLS key for {}", sidecar.name),
            identity.key_pem.into_bytes(),
        ));
        pins.push(identity.pin);
    }
    // Each gate's current addresses, which it tells a paired client (`/.soul/addresses`), so
    // that a client that reached it by any path learns where its home is now.
    for (sidecar, addresses) in stack.sidecars.iter().zip(&inputs.addresses) {
        let list: Vec<String> = addresses.iter().map(ToString::to_string).collect();
        let mut json = serde_json::json!({ "addresses": list }).to_string();
        json.push('\n');
        files.push(DesiredFile::bytes(
            &layout::gate_file(&layout::gate_addresses(&sidecar.name)),
            format!("gate's addresses for {}", sidecar.name),
            json.into_bytes(),
        ));
    }
    for (name, entry) in &registry.devices {
        let claims = claims_for(
            &stack.stack,
            name,
            entry.generation,
            entry.issued_at,
            entry.expires_at,
        );
        let token = issue(&key, &claims)?;
        for ((sidecar, addresses), pin) in stack.sidecars.iter().zip(&inputs.addresses).zip(&pins) {
            let fields = CodeFields {
                stack: &stack.stack,
                sidecar: &sidecar.name,
                device: name,
                addresses,
                pin,
            };
            let uri = PairingUri {
                fields,
                token: token.expose(),
            }
            .to_string();
            let ticket =
                crate::pairing::ticket(&link_key, &stack.stack, &sidecar.name, name, entry);
            // The QR code holds the pairing link, which a phone camera opens (at the public
            // name when the sidecar has one); with no address known yet, the pairing URI.
            let public = stack.public_name(&sidecar.name);
            let code = if addresses.is_empty() && public.is_none() {
                uri.clone()
            } else {
                PairingLink {
                    fields,
                    ticket: &ticket,
                    public: public.as_deref(),
                    browser: stack.browser_transport(),
                }
                .to_string()
            };
            let base = layout::pairing(name, &sidecar.name);
            let pair = format!("{name}/{}", sidecar.name);
            let source = hex::encode(Sha256::digest(code.as_bytes()));
            for format in [QrFormat::Png, QrFormat::Svg, QrFormat::Text] {
                let path = format!("{base}.{}", format.extension());
                let known = inputs
                    .renders
                    .files
                    .get(&path)
                    .filter(|r| r.source == source)
                    .and_then(|r| unhex32(&r.sha256));
                files.push(DesiredFile {
                    what: format!("pairing QR ({}) for {pair}", format.extension()),
                    content: FileContent::Qr {
                        text: code.clone(),
                        format,
                    },
                    hash: known,
                    path,
                });
            }
            files.push(DesiredFile::bytes(
                &format!("{base}.code"),
                format!("pairing code (the QR code's text) for {pair}"),
                code.clone().into_bytes(),
            ));
            files.push(DesiredFile::bytes(
                &format!("{base}.uri"),
                format!("pairing URI for {pair}"),
                uri.into_bytes(),
            ));
            // The `.link` file lists first the link the QR code opens.
            let browser = stack.browser_transport();
            let mut by_choice = addresses.to_vec();
            by_choice.sort_by_key(|a| Some(a.transport) != browser);
            let mut links = public
                .iter()
                .map(|name| crate::pairing::public_link(name, &ticket))
                .chain(browser_links(&by_choice, &ticket))
                .collect::<Vec<_>>()
                .join("\n");
            links.push('\n');
            files.push(DesiredFile::bytes(
                &format!("{base}.link"),
                format!("browser pairing links for {pair}"),
                links.into_bytes(),
            ));
        }
        files.push(DesiredFile::bytes(
            &layout::token(name),
            format!("token for {name}"),
            token.expose().as_bytes().to_vec(),
        ));
        // The gates hand it to a client that redeems the device's pairing ticket over TLS.
        switch.push(DesiredFile::bytes(
            &layout::gate_file(&layout::gate_device_token(name)),
            format!("gate's copy of the token for {name}"),
            token.expose().as_bytes().to_vec(),
        ));
    }
    // What the gates verify tokens with, last of all: until it is written, every token
    // issued under the old key is still admitted.
    switch.push(DesiredFile::bytes(
        &layout::gate_file(layout::GATE_PUBLIC_KEY_FILE),
        "gate's public key".into(),
        format!("{}\n", hex::encode(key.public_key())).into_bytes(),
    ));
    files.extend(switch);
    Ok(Pairing {
        key,
        key_change,
        registry,
        files,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pairing::qr;
    use crate::stack::{TransportKind, parse};
    use crate::state::KeyProblem;

    fn inputs(addresses: Vec<Vec<Address>>) -> PairingInputs {
        PairingInputs {
            key: Err(KeyProblem::Missing),
            fresh_key: StackKey::from_seed(1, [3; 32]),
            registry: Err(KeyProblem::Missing),
            issued: Issued::default(),
            renders: RenderIndex::default(),
            addresses,
            now: 1_800_000_000,
        }
    }

    fn three_addresses() -> Vec<Address> {
        vec![
            Address::new(TransportKind::Lan, "192.168.178.120", 8443),
            Address::new(TransportKind::Tailscale, "100.101.102.103", 443),
            Address::new(TransportKind::Relay, "relay.example.com", 7000),
        ]
    }

    #[test]
    fn a_one_sidecar_uri_with_three_addresses_fits_qr_version_20_at_level_m() {
        for (stack, sidecar, device) in [
            ("home", "notes", "alice-phone"),
            ("family-services", "photo-library", "grandmas-tablet-2"),
        ] {
            let src = format!(
                "stack \"{stack}\"\nsidecar \"{sidecar}\" {{ image \"i\"; port 80; }}\ndevice \"{device}\" expires=\"365d\" generation=12\n"
            );
            let s = parse("s", &src).unwrap_or_else(|d| panic!("{d}"));
            let p = desired_files(&s, inputs(vec![three_addresses()])).unwrap();
            let uri = p.files.iter().find(|f| f.path.ends_with(".uri")).unwrap();
            let FileContent::Bytes(bytes) = &uri.content else {
                panic!("uri is bytes")
            };
            let text = String::from_utf8(bytes.clone()).unwrap();
            assert_eq!(text.matches("&addr=").count(), 3);
            let code = qr::encode(&text).unwrap();
            assert!(
                qr::version(&code) <= 20,
                "{} bytes need QR version {}",
                text.len(),
                qr::version(&code)
            );
            assert!(text.len() <= 666, "{} bytes", text.len());
        }
    }

    /// The QR code's text and the `.link` file's first line for the stack's one device.
    fn code_and_first_link(src: &str) -> (String, String) {
        let s = parse("s", src).unwrap_or_else(|d| panic!("{d}"));
        let p = desired_files(&s, inputs(vec![three_addresses()])).unwrap();
        let code = p
            .files
            .iter()
            .find_map(|f| match &f.content {
                FileContent::Qr { text, .. } => Some(text.clone()),
                _ => None,
            })
            .unwrap();
        let link = p.files.iter().find(|f| f.path.ends_with(".link")).unwrap();
        let FileContent::Bytes(bytes) = &link.content else {
            panic!("the link file is bytes")
        };
        let first = String::from_utf8(bytes.clone()).unwrap();
        (code, first.lines().next().unwrap().to_string())
    }

    #[test]
    fn the_qr_link_opens_the_lan_by_default_the_chosen_overlay_or_the_public_name() {
        let base = "stack \"h\"\nsidecar \"x\" { image \"i\"; port 80; }\ndevice \"a\"\n";
        let (code, link) = code_and_first_link(&format!(
            "{base}transport {{ lan; tailscale authkey-file=\"/k\"; }}\n"
        ));
        assert!(
            code.starts_with("http://192.168.178.120:8443/?soul_ticket="),
            "{code}"
        );
        assert!(
            link.starts_with("http://192.168.178.120:8443/?soul_ticket="),
            "{link}"
        );

        let (code, link) = code_and_first_link(&format!(
            "{base}transport {{ browser \"tailscale\"; lan; tailscale authkey-file=\"/k\"; }}\n"
        ));
        assert!(
            code.starts_with("http://100.101.102.103:443/?soul_ticket="),
            "{code}"
        );
        assert!(
            link.starts_with("http://100.101.102.103:443/?soul_ticket="),
            "{link}"
        );
        // The fragment still carries every address, in the stack's order, for soul clients.
        assert!(code.contains("addr=lan"), "{code}");

        let (code, link) = code_and_first_link(&format!(
            "{base}relay \"relay.example.com:443\" pin=\"sha256//YhKJKSzoTt2b5FP18fvpHo7fJYqQCjAa3HWY3tvRMwE=\" public=#true\n"
        ));
        assert!(
            code.starts_with("https://x-h.relay.example.com/?soul_ticket="),
            "{code}"
        );
        assert!(
            link.starts_with("https://x-h.relay.example.com/?soul_ticket="),
            "{link}"
        );
    }

    #[test]
    fn first_key_rotation_and_registry() {
        let s = parse("s", "stack \"h\"\nsidecar \"x\" { image \"i\"; port 80; }\nsecret-generation 2\ndevice \"a\" expires=\"1d\"\n").unwrap();
        let p = desired_files(&s, inputs(vec![vec![]])).unwrap();
        assert_eq!(p.key_change, Some(KeyChange::First));
        assert_eq!(p.key.generation, 2);
        let e = p.registry.devices["a"];
        assert_eq!(
            (e.generation, e.issued_at, e.expires_at),
            (1, 1_800_000_000, Some(1_800_086_400))
        );
        // Same inputs with the stored key and registry: nothing changes, issued-at is kept.
        let mut again = inputs(vec![vec![]]);
        again.key = Ok(p.key.clone());
        again.registry = Ok(p.registry.clone());
        again.now += 500;
        again.fresh_key = StackKey::from_seed(2, [9; 32]);
        let q = desired_files(&s, again).unwrap();
        assert_eq!(q.key_change, None);
        assert_eq!(
            q.files,
            p.files
                .iter()
                .map(|f| DesiredFile {
                    what: if f.path == KEY_FILE {
                        "stack key".into()
                    } else {
                        f.what.clone()
                    },
                    ..f.clone()
                })
                .collect::<Vec<_>>()
        );
        // An older stored generation is a rotation.
        let mut rotated = inputs(vec![vec![]]);
        rotated.key = Ok(StackKey::from_seed(1, [3; 32]));
        rotated.registry = Ok(p.registry.clone());
        let r = desired_files(&s, rotated).unwrap();
        assert_eq!(r.key_change, Some(KeyChange::Rotated { from: 1, to: 2 }));
    }

    #[test]
    fn a_lost_key_with_paired_devices_is_an_error_not_a_new_key() {
        let s = parse(
            "s",
            "stack \"h\"\nsidecar \"x\" { image \"i\"; port 80; }\ndevice \"a\"\n",
        )
        .unwrap();
        let paired = desired_files(&s, inputs(vec![vec![]])).unwrap().registry;
        for problem in [
            KeyProblem::Missing,
            KeyProblem::Unreadable("not a soul stack key".into()),
        ] {
            let mut lost = inputs(vec![vec![]]);
            lost.key = Err(problem.clone());
            lost.registry = Ok(paired.clone());
            assert!(matches!(
                desired_files(&s, lost),
                Err(PairingError::KeyLost { devices: 1, .. })
            ));
            // With no device paired yet, nothing is lost: a key is made.
            let mut fresh = inputs(vec![vec![]]);
            fresh.key = Err(problem);
            assert!(desired_files(&s, fresh).is_ok());
        }
    }

    /// A damaged registry, or a valid key that is not the one the gates verify with, once
    /// re-issued every token: refused while the gates admit devices, allowed when none is
    /// paired or when the key is the one a rotation that began was switching to.
    #[test]
    fn a_lost_registry_or_a_strangers_key_is_refused_while_devices_are_paired() {
        let s = parse(
            "s",
            "stack \"h\"\nsidecar \"x\" { image \"i\"; port 80; }\ndevice \"a\"\n",
        )
        .unwrap();
        let key = StackKey::from_seed(1, [3; 32]);
        let paired = desired_files(&s, inputs(vec![vec![]])).unwrap().registry;
        let issued = Issued {
            gate_public_key: Some(key.public_key()),
            gate_registry: Some(paired.clone()),
            rotating_to: None,
        };
        let with = |key: StackKey, registry, issued: Issued| {
            let mut i = inputs(vec![vec![]]);
            i.key = Ok(key);
            i.registry = registry;
            i.issued = issued;
            desired_files(&s, i)
        };
        for problem in [
            KeyProblem::Missing,
            KeyProblem::Unreadable("garbage".into()),
        ] {
            assert!(matches!(
                with(key.clone(), Err(problem.clone()), issued.clone()),
                Err(PairingError::RegistryLost {
                    devices: 1,
                    gate_copy: true,
                    ..
                })
            ));
            // Nothing issued: a registry is simply made.
            assert!(with(key.clone(), Err(problem), Issued::default()).is_ok());
        }
        let stranger = StackKey::from_seed(1, [4; 32]);
        assert!(matches!(
            with(stranger.clone(), Ok(paired.clone()), issued.clone()),
            Err(PairingError::KeyMismatch { devices: 1 })
        ));
        let rotating = Issued {
            rotating_to: Some(stranger.public_key()),
            ..issued.clone()
        };
        assert!(with(stranger, Ok(paired.clone()), rotating).is_ok());
        // A rotation writes the codes first and the gate's public key last.
        let mut rotation = inputs(vec![vec![]]);
        rotation.key = Ok(StackKey::from_seed(0, [3; 32]));
        rotation.registry = Ok(paired);
        rotation.issued = issued;
        let order: Vec<String> = desired_files(&s, rotation)
            .unwrap()
            .files
            .into_iter()
            .map(|f| f.path)
            .collect();
        let at = |p: &str| order.iter().position(|f| f == p).unwrap();
        assert!(at(ROTATION_FILE) < at(KEY_FILE));
        assert!(at("tokens/a.jwt") < at(ROTATION_FILE));
        assert_eq!(order.last().map(String::as_str), Some("gate/public.key"));
    }
}
