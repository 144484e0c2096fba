//! Device tokens (DESIGN §6): EdDSA JWTs signed with the stack key, deterministic for the same
//! key, stack, device, generation and issued-at; and the one verifier the gate and the tests use.

use crate::secret::Secret;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::state::{Registry, StackKey};

/// The claims of a device token, in the order they are serialized.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// `soul:<stack>`.
    pub iss: String,
    /// `soul:<stack>`.
    pub aud: String,
    /// The device's name.
    pub sub: String,
    /// `<device>.<generation>`.
    pub jti: String,
    pub iat: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exp: Option<u64>,
}

/// Why a token was refused. The messages never contain the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not a well-formed EdDSA JWT, or the signature does not verify with the stack key.
    #[error("not a valid token of this stack: {0}")]
    Invalid(String),
    /// Signed for another stack.
    #[error("token is for another stack")]
    WrongStack,
    /// Past its `exp`.
    #[error("token of `{0}` has expired")]
    Expired(String),
    /// The device is not (or no longer) in the registry.
    #[error("device `{0}` is not paired (revoked or unknown)")]
    UnknownDevice(String),
    /// The device's generation was bumped since this token was issued.
    #[error("token of `{0}` is from an old generation")]
    OldGeneration(String),
    /// The device's registry entry changed (its expiry or issue time) since this token was
    /// issued: a newer token replaces it.
    #[error("token of `{0}` was superseded (its expiry changed)")]
    Superseded(String),
}

/// `soul:<stack>`: issuer and audience of every token of a stack.
pub fn audience(stack: &str) -> String {
    format!("soul:{stack}")
}

/// The claims a device's registry entry gives it.
pub fn claims_for(
    stack: &str,
    device: &str,
    generation: u64,
    issued_at: u64,
    expires_at: Option<u64>,
) -> Claims {
    Claims {
        iss: audience(stack),
        aud: audience(stack),
        sub: device.to_string(),
        jti: format!("{device}.{generation}"),
        iat: issued_at,
        exp: expires_at,
    }
}

/// Signs claims with the stack key (EdDSA, `typ: JWT`). Ed25519 signatures are deterministic,
/// so the same inputs give the same bytes.
pub fn issue(key: &StackKey, claims: &Claims) -> Result<Secret, TokenError> {
    let header = Header::new(Algorithm::EdDSA);
    jsonwebtoken::encode(&header, claims, &EncodingKey::from_ed_der(&key.pkcs8_der()))
        .map(Secret::from)
        .map_err(|e| TokenError::Invalid(e.to_string()))
}

/// The verifier: the algorithm is pinned to EdDSA; the signature must verify with the stack's
/// public key; iss and aud must be this stack's; `exp`, when present, must be after `now`;
/// the device must be in the registry with the generation the token carries.
pub fn verify(
    token: &str,
    public_key: &[u8; 32],
    stack: &str,
    registry: &Registry,
    now: u64,
) -> Result<Claims, TokenError> {
    let mut validation = Validation::new(Algorithm::EdDSA);
    validation.algorithms = vec![Algorithm::EdDSA];
    validation.validate_exp = false; // checked below against `now`, so tests and the gate agree
    validation.validate_aud = false; // checked below, to tell "another stack" apart
    validation.set_required_spec_claims(&["iss", "aud", "sub"]);
    validation.leeway = 0;
    let data =
        jsonwebtoken::decode::<Claims>(token, &DecodingKey::from_ed_der(public_key), &validation)
            .map_err(|e| TokenError::Invalid(e.kind_description()))?;
    let claims = data.claims;
    let aud = audience(stack);
    if claims.iss != aud || claims.aud != aud {
        return Err(TokenError::WrongStack);
    }
    if claims.exp.is_some_and(|exp| exp <= now) {
        return Err(TokenError::Expired(claims.sub));
    }
    let Some(entry) = registry.devices.get(&claims.sub) else {
        return Err(TokenError::UnknownDevice(claims.sub));
    };
    if claims.jti != format!("{}.{}", claims.sub, entry.generation) {
        return Err(TokenError::OldGeneration(claims.sub));
    }
    // The registry entry is the device's current grant: a token issued under an earlier one
    // (another issued-at, or an expiry that was since added, shortened or lifted) is revoked.
    if claims.iat != entry.issued_at || claims.exp != entry.expires_at {
        return Err(TokenError::Superseded(claims.sub));
    }
    Ok(claims)
}

/// A short description of a jsonwebtoken error, without any token content.
trait KindDescription {
    fn kind_description(&self) -> String;
}

impl KindDescription for jsonwebtoken::errors::Error {
    fn kind_description(&self) -> String {
        use jsonwebtoken::errors::ErrorKind as K;
        match self.kind() {
            K::InvalidSignature => "bad signature".into(),
            K::InvalidAlgorithm => "algorithm not allowed (only EdDSA)".into(),
            K::InvalidToken => "malformed token".into(),
            K::MissingRequiredClaim(c) => format!("missing claim `{c}`"),
            K::InvalidIssuer => "wrong issuer".into(),
            _ => "cannot decode".into(),
        }
    }
}

/// Now, in the unix seconds tokens count in (`iat`, `exp`).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {

    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;

    use super::*;

    /// The token as the text a client sends.
    fn issue(key: &StackKey, claims: &Claims) -> Result<String, TokenError> {
        super::issue(key, claims).map(|token| token.expose().to_string())
    }

    fn registry(devices: &[(&str, u64)]) -> Registry {
        Registry::of_generations(devices, 1000)
    }

    fn key() -> StackKey {
        StackKey::from_seed(1, [7u8; 32])
    }

    #[test]
    fn deterministic_and_verifiable() {
        let k = key();
        let c = claims_for("home", "alice", 1, 1000, None);
        let a = issue(&k, &c).unwrap();
        assert_eq!(a, issue(&k, &c).unwrap());
        assert!(
            a.len() < 320,
            "token too long for a small QR: {} bytes",
            a.len()
        );
        let got = verify(
            &a,
            &k.public_key(),
            "home",
            &registry(&[("alice", 1)]),
            2000,
        )
        .unwrap();
        assert_eq!(got, c);
    }

    #[test]
    fn refusals() {
        let k = key();
        let mut reg = registry(&[("alice", 2), ("bob", 1)]);
        reg.devices.get_mut("alice").unwrap().expires_at = Some(5000);
        let pk = k.public_key();
        let ok = issue(&k, &claims_for("home", "alice", 2, 1000, Some(5000))).unwrap();
        assert!(verify(&ok, &pk, "home", &reg, 4999).is_ok());
        // Expired.
        assert_eq!(
            verify(&ok, &pk, "home", &reg, 5000),
            Err(TokenError::Expired("alice".into()))
        );
        // Another stack's token (signed with the same key even).
        let other = issue(&k, &claims_for("work", "alice", 2, 1000, None)).unwrap();
        assert_eq!(
            verify(&other, &pk, "home", &reg, 0),
            Err(TokenError::WrongStack)
        );
        // Old generation.
        let old = issue(&k, &claims_for("home", "alice", 1, 1000, None)).unwrap();
        assert_eq!(
            verify(&old, &pk, "home", &reg, 0),
            Err(TokenError::OldGeneration("alice".into()))
        );
        // The registry entry's expiry was added, shortened or lifted since the token was
        // issued: the old token is superseded, even though its own `exp` is still ahead.
        let mut expiring = reg.clone();
        expiring.devices.get_mut("alice").unwrap().expires_at = Some(1001);
        let unlimited = issue(&k, &claims_for("home", "alice", 2, 1000, None)).unwrap();
        assert_eq!(
            verify(&unlimited, &pk, "home", &expiring, 0),
            Err(TokenError::Superseded("alice".into()))
        );
        assert_eq!(
            verify(&ok, &pk, "home", &expiring, 0),
            Err(TokenError::Superseded("alice".into()))
        );
        let lifted = registry(&[("alice", 2)]);
        assert_eq!(
            verify(&ok, &pk, "home", &lifted, 0),
            Err(TokenError::Superseded("alice".into())),
            "the expiry was lifted: a token that still carries one is superseded"
        );
        // Revoked device.
        let carol = issue(&k, &claims_for("home", "carol", 1, 1000, None)).unwrap();
        assert_eq!(
            verify(&carol, &pk, "home", &reg, 0),
            Err(TokenError::UnknownDevice("carol".into()))
        );
        // Another key.
        let stranger = issue(
            &StackKey::from_seed(1, [9u8; 32]),
            &claims_for("home", "alice", 2, 1000, None),
        )
        .unwrap();
        assert!(matches!(
            verify(&stranger, &pk, "home", &reg, 0),
            Err(TokenError::Invalid(_))
        ));
        // Changed sub: the signature no longer matches.
        let parts: Vec<&str> = ok.split('.').collect();
        let payload = String::from_utf8(B64.decode(parts[1]).unwrap())
            .unwrap()
            .replace("\"alice\"", "\"bob\"");
        let forged = format!("{}.{}.{}", parts[0], B64.encode(payload), parts[2]);
        assert!(matches!(
            verify(&forged, &pk, "home", &reg, 0),
            Err(TokenError::Invalid(_))
        ));
        // alg: none.
        let none_header = B64.encode(r#"{"alg":"none","typ":"JWT"}"#);
        let unsigned = format!("{none_header}.{}.", parts[1]);
        assert!(matches!(
            verify(&unsigned, &pk, "home", &reg, 0),
            Err(TokenError::Invalid(_))
        ));
        // HS256 signed with the public key bytes as the HMAC secret.
        let hs = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims_for("home", "alice", 2, 1000, None),
            &EncodingKey::from_secret(&pk),
        )
        .unwrap();
        assert!(matches!(
            verify(&hs, &pk, "home", &reg, 0),
            Err(TokenError::Invalid(_))
        ));
        // Tampered signature.
        let mut sig = B64.decode(parts[2]).unwrap();
        sig[0] ^= 1;
        let tampered = format!("{}.{}.{}", parts[0], parts[1], B64.encode(sig));
        assert!(matches!(
            verify(&tampered, &pk, "home", &reg, 0),
            Err(TokenError::Invalid(_))
        ));
        // Garbage.
        assert!(matches!(
            verify("not.a.jwt", &pk, "home", &reg, 0),
            Err(TokenError::Invalid(_))
        ));
    }
}
