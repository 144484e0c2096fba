//! `soul init`: a first stack.kdl, commented, for one service on the LAN and one device.

/// What `soul init` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Init {
    pub stack: String,
    pub image: String,
    pub port: u16,
}

impl Init {
    /// The sidecar's name: the image's last path segment without its tag (`ghcr.io/x/notes:1`
    /// is `notes`), made a valid name.
    pub fn sidecar(&self) -> String {
        let base = self.image.rsplit('/').next().unwrap_or(&self.image);
        let base = base.split([':', '@']).next().unwrap_or(base);
        name_from(base, "app")
    }

    /// The file's text.
    pub fn text(&self) -> String {
        let q = |s: &str| serde_json::to_string(s).unwrap_or_default();
        format!(
            "// stack.kdl: what soul runs on this machine. Commit it; `soul apply` drives the machine to
// it, `soul watch` keeps it there. The whole format: `soul schema`, and docs/stack-format.md in
// soul's repository.
stack {stack}

// Your service. soul runs it in a pod behind its gate: only paired devices get in.
sidecar {sidecar} {{
    image {image}
    port {port}                // the port the service listens on inside its container
    // env \"TZ\" \"Europe/Berlin\"
    // volume \"data\" \"/data\"   // a named volume soul makes and keeps
}}

// How devices reach it. The LAN first; add an overlay with `soul bridge init`.
transport {{
    lan port=8443             // http://<this machine>:8443/
}}

// Who may come in: each device gets a token and a QR code (`soul pair my-phone`).
device \"my-phone\"
",
            stack = q(&self.stack),
            sidecar = q(&self.sidecar()),
            image = q(&self.image),
            port = self.port,
        )
    }
}

/// `raw` as a stack or sidecar name (`^[a-z][a-z0-9-]{0,31}$`), or `fallback` when nothing of
/// it is left.
pub fn name_from(raw: &str, fallback: &str) -> String {
    let mut name: String = raw
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    name = name
        .trim_start_matches(|c: char| !c.is_ascii_lowercase())
        .to_string();
    name.truncate(32);
    let name = name.trim_end_matches('-').to_string();
    if name.is_empty() {
        fallback.to_string()
    } else {
        name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_stack_is_valid_and_names_come_from_what_was_given() {
        let init = Init {
            stack: name_from("My Home_Lab", "home"),
            image: "ghcr.io/example/Notes-App:1.4@sha256:abc".into(),
            port: 8080,
        };
        assert_eq!(init.stack, "my-home-lab");
        assert_eq!(init.sidecar(), "notes-app");
        let stack = crate::stack::parse("stack.kdl", &init.text()).expect("valid");
        assert_eq!(stack.sidecars[0].port, 8080);
        assert_eq!(stack.devices[0].name, "my-phone");
        assert_eq!(name_from("42", "home"), "home");
        assert_eq!(name_from("9lives", "home"), "lives");
    }
}
