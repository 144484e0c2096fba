//! Browser sessions: what a pairing link is redeemed for. A session cookie names the device and
//! carries an HMAC under the stack's link key over the stack, this sidecar and the device's
//! current registry entry, so a cookie that leaks to another service on the same host is worth
//! one sidecar's access at most, never the device token, and it ends when the device is
//! removed, re-issued (`generation=`, `expires=`) or the stack key rotates.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;

use crate::pairing::{mac, mac_matches};
use crate::state::{DeviceEntry, Registry};

/// The longest a session lasts: browsers cap a cookie's lifetime at 400 days.
pub const MAX_LIFETIME: u64 = 400 * 86_400;

/// Why a session cookie was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    #[error("not a session of this sidecar")]
    Invalid,
    #[error("device `{0}` is not paired (revoked or unknown)")]
    UnknownDevice(String),
    #[error("the session of `{0}` was superseded (new generation, expiry or stack key)")]
    Superseded(String),
    #[error("the session of `{0}` has expired")]
    Expired(String),
}

impl SessionError {
    pub fn device(&self) -> &str {
        match self {
            SessionError::Invalid => "-",
            SessionError::UnknownDevice(d)
            | SessionError::Superseded(d)
            | SessionError::Expired(d) => d,
        }
    }
}

/// One sidecar's gate, as far as sessions go.
#[derive(Debug, Clone, Copy)]
pub struct Scope<'a> {
    pub key: &'a [u8; 32],
    pub stack: &'a str,
    pub sidecar: &'a str,
}

impl Scope<'_> {
    /// What a session's MAC covers: this gate, the device's registry entry, the session's end.
    fn parts(&self, device: &str, entry: &DeviceEntry, until: u64) -> [String; 8] {
        [
            "session".into(),
            self.stack.into(),
            self.sidecar.into(),
            device.into(),
            entry.generation.to_string(),
            entry.issued_at.to_string(),
            entry.expires_at.map(|x| x.to_string()).unwrap_or_default(),
            until.to_string(),
        ]
    }

    fn mac(&self, device: &str, entry: &DeviceEntry, until: u64) -> String {
        let parts = self.parts(device, entry, until);
        B64.encode(mac(self.key, &parts.each_ref().map(String::as_str)))
    }

    /// A new session for `device`: the cookie's value and its lifetime in seconds, which ends
    /// with the device's expiry or after [`MAX_LIFETIME`]. `None` when the device has expired.
    pub fn mint(&self, device: &str, entry: &DeviceEntry, now: u64) -> Option<(String, u64)> {
        let until = entry
            .expires_at
            .unwrap_or(u64::MAX)
            .min(now.saturating_add(MAX_LIFETIME));
        (until > now).then(|| {
            let value = format!(
                "{device}.{}.{until}.{}",
                entry.generation,
                self.mac(device, entry, until)
            );
            (value, until - now)
        })
    }

    /// The device a session belongs to, and when it ends.
    pub fn verify(
        &self,
        value: &str,
        registry: &Registry,
        now: u64,
    ) -> Result<(String, u64), SessionError> {
        let mut parts = value.splitn(4, '.');
        let (Some(device), Some(generation), Some(until), Some(given)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(SessionError::Invalid);
        };
        let (Ok(generation), Ok(until)) = (generation.parse::<u64>(), until.parse::<u64>()) else {
            return Err(SessionError::Invalid);
        };
        let Some(entry) = registry.devices.get(device) else {
            return Err(SessionError::UnknownDevice(device.to_string()));
        };
        let parts = self.parts(device, entry, until);
        let covered = parts.each_ref().map(String::as_str);
        if !mac_matches(self.key, &covered, given, 32) || generation != entry.generation {
            return Err(SessionError::Superseded(device.to_string()));
        }
        if until <= now {
            return Err(SessionError::Expired(device.to_string()));
        }
        Ok((device.to_string(), until))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(generation: u64, expires_at: Option<u64>) -> DeviceEntry {
        DeviceEntry {
            generation,
            issued_at: 1000,
            expires_at,
        }
    }

    fn registry(e: DeviceEntry) -> Registry {
        let mut r = Registry::default();
        r.devices.insert("alice".into(), e);
        r
    }

    #[test]
    fn a_session_is_one_sidecars_and_ends_with_the_devices_grant() {
        let key = [9u8; 32];
        let notes = Scope {
            key: &key,
            stack: "home",
            sidecar: "notes",
        };
        let (value, max_age) = notes.mint("alice", &entry(1, None), 2000).unwrap();
        assert_eq!(max_age, MAX_LIFETIME);
        let reg = registry(entry(1, None));
        assert_eq!(
            notes.verify(&value, &reg, 2001),
            Ok(("alice".into(), 2000 + MAX_LIFETIME))
        );
        let photos = Scope {
            sidecar: "photos",
            ..notes
        };
        assert_eq!(
            photos.verify(&value, &reg, 2001),
            Err(SessionError::Superseded("alice".into())),
            "a sibling sidecar's gate refuses it"
        );
        for changed in [entry(2, None), entry(1, Some(9000))] {
            assert!(notes.verify(&value, &registry(changed), 2001).is_err());
        }
        assert_eq!(
            notes.verify(&value, &Registry::default(), 2001),
            Err(SessionError::UnknownDevice("alice".into()))
        );
        assert_eq!(
            notes.verify(&value, &reg, 2000 + MAX_LIFETIME),
            Err(SessionError::Expired("alice".into()))
        );
        // A device that expires sooner: the session ends with it.
        let (short, age) = notes.mint("alice", &entry(1, Some(2500)), 2000).unwrap();
        assert_eq!(age, 500);
        let reg = registry(entry(1, Some(2500)));
        assert!(notes.verify(&short, &reg, 2499).is_ok());
        assert!(notes.verify(&short, &reg, 2500).is_err());
        assert_eq!(notes.mint("alice", &entry(1, Some(2000)), 2000), None);
        // Tampering with any part.
        let forged = short.replacen("2500", "9999", 1);
        assert!(notes.verify(&forged, &reg, 2001).is_err());
        for garbage in ["", "alice", "alice.1.2500", "alice.x.1.y"] {
            assert_eq!(notes.verify(garbage, &reg, 0), Err(SessionError::Invalid));
        }
    }
}
