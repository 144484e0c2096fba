//! The pairing codes apply left in the state dir, looked up for one device and sidecar: what
//! `soul pair` prints. Errors say what to do (`did you mean`, `run soul apply first`).

use crate::stack::Stack;
use crate::state::{StateDir, layout};

/// Why a pairing code cannot be shown.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodeError {
    #[error("no device `{device}` in stack `{stack}`: {hint}")]
    UnknownDevice {
        device: String,
        stack: String,
        hint: String,
    },
    #[error("no sidecar `{named}`; the stack has: {sidecars}")]
    UnknownSidecar { named: String, sidecars: String },
    #[error("the stack has several sidecars; choose one with --sidecar ({sidecars})")]
    WhichSidecar { sidecars: String },
    #[error("no pairing code for {device}/{sidecar} in {dir} yet: run `soul apply` first")]
    NotYet {
        device: String,
        sidecar: String,
        dir: String,
    },
    #[error("{device}/{sidecar} has no known address yet: check `soul bridge status`")]
    NoAddress { device: String, sidecar: String },
}

/// The sidecar `named`, or the stack's only one.
pub fn one_sidecar(stack: &Stack, named: Option<&str>) -> Result<String, CodeError> {
    let sidecars = || {
        stack
            .sidecars
            .iter()
            .map(|x| x.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    match (named, stack.sidecars.as_slice()) {
        (Some(s), all) if all.iter().any(|x| x.name == s) => Ok(s.to_string()),
        (Some(s), _) => Err(CodeError::UnknownSidecar {
            named: s.to_string(),
            sidecars: sidecars(),
        }),
        (None, [only]) => Ok(only.name.clone()),
        (None, _) => Err(CodeError::WhichSidecar {
            sidecars: sidecars(),
        }),
    }
}

/// `device`'s pairing code for `sidecar` (see [`one_sidecar`]) in the form whose file
/// extension is `ext` (`uri`, `link`, `png`, `svg`, `txt`), and the sidecar it is for.
pub fn pairing_code(
    stack: &Stack,
    state: &StateDir,
    device: &str,
    sidecar: Option<&str>,
    ext: &str,
) -> Result<(String, Vec<u8>), CodeError> {
    if !stack.devices.iter().any(|d| d.name == device) {
        let names: Vec<&str> = stack.devices.iter().map(|d| d.name.as_str()).collect();
        let hint = crate::stack::did_you_mean(device, &names)
            .map(|n| format!("did you mean `{n}`?"))
            .unwrap_or_else(|| {
                format!("add `device \"{device}\"` to stack.kdl and run `soul apply`")
            });
        return Err(CodeError::UnknownDevice {
            device: device.to_string(),
            stack: stack.stack.clone(),
            hint,
        });
    }
    let sidecar = one_sidecar(stack, sidecar)?;
    let path = format!("{}.{ext}", layout::pairing(device, &sidecar));
    let bytes = state.read(&path).map_err(|_| CodeError::NotYet {
        device: device.to_string(),
        sidecar: sidecar.clone(),
        dir: state.path().display().to_string(),
    })?;
    if ext == "link" && bytes.trim_ascii().is_empty() {
        return Err(CodeError::NoAddress {
            device: device.to_string(),
            sidecar,
        });
    }
    Ok((sidecar, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pairing_code_is_found_or_the_error_says_what_to_do() {
        let stack = crate::stack::parse(
            "s",
            "stack \"home\"\nsidecar \"a\" { image \"i\"; port 1; }\nsidecar \"b\" { image \"i\"; port 1; }\ndevice \"alice-phone\"\n",
        )
        .unwrap_or_else(|d| panic!("{d}"));
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        let code = |device: &str, sidecar: Option<&str>, ext: &str| {
            pairing_code(&stack, &state, device, sidecar, ext)
        };
        let e = code("alice-phon", Some("a"), "uri").unwrap_err();
        assert!(e.to_string().contains("did you mean `alice-phone`?"), "{e}");
        let e = code("alice-phone", None, "uri").unwrap_err();
        assert!(matches!(e, CodeError::WhichSidecar { .. }), "{e}");
        assert!(e.to_string().contains("--sidecar (a, b)"), "{e}");
        let e = code("alice-phone", Some("c"), "uri").unwrap_err();
        assert!(matches!(e, CodeError::UnknownSidecar { .. }), "{e}");
        let e = code("alice-phone", Some("a"), "uri").unwrap_err();
        assert!(e.to_string().ends_with("run `soul apply` first"), "{e}");
        state
            .write("pairing/alice-phone/a.uri", b"soul://pair?x")
            .unwrap();
        state.write("pairing/alice-phone/a.link", b"\n").unwrap();
        assert_eq!(
            code("alice-phone", Some("a"), "uri").unwrap(),
            ("a".to_string(), b"soul://pair?x".to_vec())
        );
        let e = code("alice-phone", Some("a"), "link").unwrap_err();
        assert!(matches!(e, CodeError::NoAddress { .. }), "{e}");
    }
}
