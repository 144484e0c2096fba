//! The semantic rules of STACK-FORMAT.md that a schema cannot express: uniqueness, port
//! clashes, transports that `order` names, tailnet tags and hostnames the Tailscale client takes,
//! one value source per env, durations.

use std::collections::HashMap;
use std::time::Duration;

use super::diagnostic::Problem;
use super::lower::SpanMap;
use super::model::{
    EnvSource, Stack, TransportKind, is_tailnet_hostname, parse_duration, tailscale_tags_problem,
};

/// Checks every rule and returns every problem found.
pub fn check(stack: &Stack, spans: &SpanMap) -> Vec<Problem> {
    let mut problems = Vec::new();
    unique_names(stack, spans, &mut problems);
    ports(stack, spans, &mut problems);
    transports(stack, spans, &mut problems);
    public_names(stack, spans, &mut problems);
    sidecar_details(stack, spans, &mut problems);
    what_docker_refuses(stack, spans, &mut problems);
    durations(stack, spans, &mut problems);
    problems
}

fn unique_names(stack: &Stack, spans: &SpanMap, problems: &mut Vec<Problem>) {
    let mut seen = HashMap::new();
    for (i, s) in stack.sidecars.iter().enumerate() {
        if let Some(first) = seen.insert(s.name.as_str(), i) {
            problems.push(
                Problem::new(spans.get(&format!("/sidecars/{i}/name")), format!("sidecar `{}` is declared twice", s.name))
                    .label("duplicate name")
                    .help(format!("sidecar names must be unique; rename this one or remove it (the first is sidecar #{})", first + 1)),
            );
        }
    }
    let mut seen = HashMap::new();
    for (i, d) in stack.devices.iter().enumerate() {
        if seen.insert(d.name.as_str(), i).is_some() {
            problems.push(
                Problem::new(spans.get(&format!("/devices/{i}/name")), format!("device `{}` is declared twice", d.name))
                    .label("duplicate name")
                    .help("device names must be unique; to re-issue a device's token, bump its generation= instead"),
            );
        }
    }
}

fn ports(stack: &Stack, spans: &SpanMap, problems: &mut Vec<Problem>) {
    let gate = stack.gate.port;
    for (i, s) in stack.sidecars.iter().enumerate() {
        if s.port == gate {
            problems.push(
                Problem::new(spans.get(&format!("/sidecars/{i}/port")), format!("sidecar `{}` uses port {gate}, which is the gate's port", s.name))
                    .label("clashes with the gate")
                    .help(format!("the gate listens on {gate} inside every pod; move the app or set `gate port=` to another port")),
            );
        }
    }
    let Some(lan_ports) = stack.lan_ports() else {
        return;
    };
    let mut seen: HashMap<u16, usize> = HashMap::new();
    let base_pointer = "/transport/lan/port";
    for (i, (s, port)) in stack.sidecars.iter().zip(&lan_ports).enumerate() {
        let pointer = if s.lan_port.is_some() {
            format!("/sidecars/{i}/lan-port")
        } else {
            base_pointer.to_string()
        };
        if s.lan_port.is_none() && *port == u16::MAX && i > 0 {
            problems.push(
                Problem::new(
                    spans.get(&pointer),
                    format!("sidecar `{}` would get a LAN port above 65535", s.name),
                )
                .help("lower `lan port=` or give this sidecar its own `lan-port`"),
            );
        }
        if let Some(first) = seen.insert(*port, i) {
            problems.push(
                Problem::new(spans.get(&format!("/sidecars/{i}/name")), format!(
                    "sidecars `{}` and `{}` would both publish LAN port {port}",
                    stack.sidecars[first].name, s.name
                ))
                .label("LAN port clash")
                .help("with several sidecars, `lan port=` is the first and the rest follow; give this one a free `lan-port`"),
            );
        }
    }
}

/// `relay … public=#true`: every sidecar's public name must be a DNS name the relay can
/// route and a CA can issue for; `acme` only matters with public names.
fn public_names(stack: &Stack, spans: &SpanMap, problems: &mut Vec<Problem>) {
    use super::{is_dns_label, is_domain};
    let public = stack.relay.as_ref().filter(|r| r.public);
    if let Some(relay) = public {
        let domain = relay
            .domain
            .clone()
            .or_else(|| relay.host_port().map(|(h, _)| h));
        match domain {
            Some(d) if is_domain(&d) => {
                for s in &stack.sidecars {
                    let label = format!("{}-{}", s.name, stack.stack);
                    if !is_dns_label(&label) {
                        problems.push(
                            Problem::new(spans.get("/relay"), format!("the public name of sidecar `{}` would start with `{label}`, longer than a DNS label (63)", s.name))
                                .help("shorten the stack's or the sidecar's name"),
                        );
                    }
                }
            }
            _ => problems.push(
                Problem::new(
                    spans.get("/relay/public"),
                    "`public=#true` needs the relay's domain: its endpoint is not a DNS name",
                )
                .label("no domain")
                .help(format!(
                    "add the domain the relay's file names, e.g. `relay \"{}\" pin=… public=#true domain=\"relay.example.com\"`",
                    relay.endpoint
                )),
            ),
        }
    }
    if stack.acme.is_some() && public.is_none() {
        problems.push(
            Problem::new(
                spans.get("/acme"),
                "`acme` has no effect without public names",
            )
            .label("no public name")
            .help("add `public=#true` to the stack's `relay`, or remove `acme`"),
        );
    }
}

fn transports(stack: &Stack, spans: &SpanMap, problems: &mut Vec<Problem>) {
    let Some(t) = &stack.transport else {
        return;
    };
    if t.tailscale.is_some() && t.headscale.is_some() {
        problems.push(
            Problem::new(spans.get("/transport/headscale"), "`tailscale` and `headscale` cannot both be declared")
                .label("second tailnet")
                .help("a pod joins one tailnet: keep `tailscale` for Tailscale's servers or `headscale url=…` for your own"),
        );
    }
    let nodes = [
        ("tailscale", t.tailscale.as_ref()),
        ("headscale", t.headscale.as_ref().map(|h| &h.node)),
    ];
    for (kind, node) in nodes {
        let Some(node) = node else { continue };
        if let Some(why) = node.tags.as_deref().and_then(tailscale_tags_problem) {
            problems.push(
                Problem::new(spans.get(&format!("/transport/{kind}/tags")), format!("`tailscale up` would refuse these tags: {why}"))
                    .label("the node's container would restart forever")
                    .help("tags are `tag:<name>` (a letter, then letters, digits and `-`), separated by commas without spaces: `tags=\"tag:soul,tag:home\"`"),
            );
        }
        if let Some(name) = node.hostname.as_deref()
            && !is_tailnet_hostname(name)
        {
            problems.push(
                Problem::new(spans.get(&format!("/transport/{kind}/hostname")), format!("`{name}` is not a hostname the Tailscale client takes"))
                    .label("the node's container would restart forever")
                    .help("a hostname is one DNS label: 1–63 letters, digits and `-`, not starting or ending with `-` (e.g. `home-notes`); without `hostname`, soul uses `<stack>-<sidecar>`"),
            );
        }
    }
    if let Some(relay) = &stack.relay
        && relay.pin.is_none()
    {
        problems.push(
            Problem::new(spans.get("/relay"), "`relay` needs the pin of the relay's key")
                .label("no pin=")
                .help(format!(
                    "the pods' agents speak TLS to the relay and pin its key: run `soul relay status` on the relay and add its pin, e.g. `relay \"{}\" pin=\"sha256//…\"`",
                    relay.endpoint
                )),
        );
    }
    if t.nebula.is_some() && stack.sidecars.len() > 1 {
        problems.push(
            Problem::new(spans.get("/transport/nebula"), "`nebula` gives a stack one overlay IP, but this stack has several sidecars")
                .label("one certificate, several pods")
                .help("a Nebula certificate names one host: keep one sidecar in a stack that uses nebula, or use tailscale"),
        );
    }
    if let Some(browser) = t.browser {
        let span = spans.get("/transport/browser");
        if browser == TransportKind::Relay {
            problems.push(
                Problem::new(span, "a browser cannot pair through the relay's address")
                    .label("carries soul clients only")
                    .help("give the stack a public name for browsers: `relay \"…\" pin=\"…\" public=#true`"),
            );
        } else if !stack.declares(browser) {
            problems.push(
                Problem::new(
                    span,
                    format!("`browser` names `{}`, which is not declared", browser.as_str()),
                )
                .label("not declared")
                .help(format!(
                    "declare `{}` inside `transport {{ … }}`, or drop `browser` to open the LAN address",
                    browser.as_str()
                )),
            );
        } else if stack.relay.as_ref().is_some_and(|r| r.public) {
            problems.push(
                Problem::new(span, "`browser` has no effect: the stack has a public name")
                    .label("the link opens https://<public name>/")
                    .help("drop `browser`, or drop `public=#true` from `relay`"),
            );
        }
    }
    if let Some(order) = &t.order {
        let mut seen = Vec::new();
        for (i, kind) in order.iter().enumerate() {
            let span = spans.get(&format!("/transport/order/{i}"));
            if seen.contains(kind) {
                problems.push(
                    Problem::new(
                        span,
                        format!("`{}` appears twice in `order`", kind.as_str()),
                    )
                    .help("list each transport once"),
                );
            }
            seen.push(*kind);
            if !stack.declares(*kind) {
                let how = match kind {
                    TransportKind::Relay => {
                        "add a top-level `relay \"host:port\" pin=\"sha256//…\"`".to_string()
                    }
                    k => format!(
                        "declare `{}` inside `transport {{ … }}` or drop it from `order`",
                        k.as_str()
                    ),
                };
                problems.push(
                    Problem::new(
                        span,
                        format!("`order` names `{}`, which is not declared", kind.as_str()),
                    )
                    .label("not declared")
                    .help(how),
                );
            }
        }
    }
}

fn sidecar_details(stack: &Stack, spans: &SpanMap, problems: &mut Vec<Problem>) {
    for (i, s) in stack.sidecars.iter().enumerate() {
        for (j, e) in s.env.iter().enumerate() {
            let given = [e.value.is_some(), e.file.is_some(), e.from_env.is_some()]
                .into_iter()
                .filter(|b| *b)
                .count();
            if given != 1 {
                problems.push(
                    Problem::new(spans.get(&format!("/sidecars/{i}/env/{j}")), format!("env `{}` needs exactly one value source, found {given}", e.name))
                        .help(format!("write `env \"{0}\" \"value\"`, `env \"{0}\" file=\"/run/secrets/…\"` or `env \"{0}\" from-env=\"VAR\"`", e.name)),
                );
            } else if let EnvSource::Literal(v) = e.source()
                && looks_like_secret_name(&e.name)
                && !v.is_empty()
            {
                // A literal password is legal KDL but lands in git; say so without refusing
                // values like `DB_PASSWORD_FILE` paths.
                if !v.starts_with('/') {
                    problems.push(
                        Problem::new(spans.get(&format!("/sidecars/{i}/env/{j}/value")), format!("env `{}` looks like a secret written into stack.kdl", e.name))
                            .label("literal secret")
                            .help(format!("stack.kdl is committed to git: use `env \"{}\" file=\"/run/secrets/…\"` or from-env=\"…\"", e.name)),
                    );
                }
            }
        }
        for (j, v) in s.volumes.iter().enumerate() {
            if v.is_bind() && v.external {
                problems.push(
                    Problem::new(
                        spans.get(&format!("/sidecars/{i}/volumes/{j}/external")),
                        format!(
                            "`{}` is a host path: only a named volume can be external",
                            v.source
                        ),
                    )
                    .help("drop `external=#true`: host paths are always mounted as they are"),
                );
            }
            if !v.is_bind() && !is_volume_name(&v.source) {
                problems.push(
                    Problem::new(spans.get(&format!("/sidecars/{i}/volumes/{j}/source")), format!("`{}` is neither a host path nor a volume name", v.source))
                        .help("a host path starts with `/`; a named volume uses letters, digits, `_`, `.` and `-`"),
                );
            }
        }
        if let Some(h) = &s.health
            && h.url.is_some() == h.cmd.is_some()
        {
            problems.push(
                Problem::new(spans.get(&format!("/sidecars/{i}/health")), "`health` needs either a URL or cmd=, not both")
                    .help("write `health \"http://127.0.0.1:8080/healthz\"` or `health cmd=\"pg_isready\"`"),
            );
        }
    }
}

fn looks_like_secret_name(name: &str) -> bool {
    let n = name.to_ascii_uppercase();
    [
        "PASSWORD",
        "SECRET",
        "TOKEN",
        "AUTHKEY",
        "AUTH_KEY",
        "API_KEY",
        "PRIVATE_KEY",
    ]
    .iter()
    .any(|s| n.contains(s))
        && !n.ends_with("_FILE")
}

fn is_volume_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
}

/// The longest volume name stack.kdl may give (Docker's limit less soul's prefix).
pub const MAX_VOLUME_NAME: usize = 128;

/// What Docker would refuse after soul had already changed something: caught here, where it is
/// a property of the file.
fn what_docker_refuses(stack: &Stack, spans: &SpanMap, problems: &mut Vec<Problem>) {
    for (i, s) in stack.sidecars.iter().enumerate() {
        for (j, e) in s.env.iter().enumerate() {
            for (field, text) in [("name", Some(&e.name)), ("value", e.value.as_ref())] {
                if text.is_some_and(|t| t.contains('\0')) {
                    problems.push(
                        Problem::new(spans.get(&format!("/sidecars/{i}/env/{j}/{field}")), format!("env `{}` holds a NUL character, which no process environment can carry", e.name.replace('\0', "\\0")))
                            .help("remove the \\u{0} escape"),
                    );
                }
            }
        }
        for (j, arg) in s.command.iter().flatten().enumerate() {
            if arg.contains('\0') {
                problems.push(
                    Problem::new(
                        spans.get(&format!("/sidecars/{i}/command/{j}")),
                        "a command argument holds a NUL character, which no process can receive",
                    )
                    .help("remove the \\u{0} escape"),
                );
            }
        }
        let mut targets: HashMap<&str, usize> = HashMap::new();
        for (j, v) in s.volumes.iter().enumerate() {
            let target = v.target.trim_end_matches('/');
            if target.is_empty() {
                problems.push(
                    Problem::new(
                        spans.get(&format!("/sidecars/{i}/volumes/{j}/target")),
                        "a volume cannot be mounted over `/`, the container's whole filesystem",
                    )
                    .help("mount it on a directory such as \"/data\""),
                );
            } else if let Some(first) = targets.insert(target, j) {
                problems.push(
                    Problem::new(
                        spans.get(&format!("/sidecars/{i}/volumes/{j}/target")),
                        format!(
                            "two volumes of sidecar `{}` are mounted at `{}`",
                            s.name, v.target
                        ),
                    )
                    .label("second mount here")
                    .help(format!(
                        "give each volume its own target (the first is volume #{})",
                        first + 1
                    )),
                );
            }
            if !v.is_bind() && v.source.chars().count() > MAX_VOLUME_NAME {
                problems.push(
                    Problem::new(
                        spans.get(&format!("/sidecars/{i}/volumes/{j}/source")),
                        format!("volume names are at most {MAX_VOLUME_NAME} characters"),
                    )
                    .help("choose a shorter name"),
                );
            }
            if v.source.contains('\0') || v.target.contains('\0') {
                problems.push(
                    Problem::new(
                        spans.get(&format!("/sidecars/{i}/volumes/{j}")),
                        "a volume path holds a NUL character",
                    )
                    .help("remove the \\u{0} escape"),
                );
            }
        }
    }
}

/// Health check timing Docker accepts: 0 or at least 1 ms, and (as nanoseconds) within an i64;
/// soul asks for at most a day, which no health check needs more than.
const HEALTH_TIMING: (Duration, Duration) = (Duration::from_millis(1), Duration::from_secs(86_400));

fn durations(stack: &Stack, spans: &SpanMap, problems: &mut Vec<Problem>) {
    for (i, s) in stack.sidecars.iter().enumerate() {
        let Some(h) = &s.health else { continue };
        for (field, value) in [("interval", &h.interval), ("timeout", &h.timeout)] {
            let (min, max) = HEALTH_TIMING;
            if let Some(d) = value.as_deref().and_then(parse_duration)
                && !(min..=max).contains(&d)
            {
                problems.push(
                    Problem::new(spans.get(&format!("/sidecars/{i}/health/{field}")), format!("health `{field}` must be between 1ms and 24h"))
                        .help("a health check runs every few seconds: try interval=\"10s\" timeout=\"2s\""),
                );
            }
        }
    }
    duration_syntax(stack, spans, problems);
}

fn duration_syntax(stack: &Stack, spans: &SpanMap, problems: &mut Vec<Problem>) {
    let mut check = |pointer: String, value: &Option<String>| {
        if let Some(v) = value
            && parse_duration(v).is_none()
        {
            problems.push(
                Problem::new(spans.get(&pointer), format!("`{v}` is not a duration"))
                    .help("durations look like \"500ms\", \"10s\", \"5m\", \"2h\" or \"90d\""),
            );
        }
    };
    for (i, s) in stack.sidecars.iter().enumerate() {
        if let Some(h) = &s.health {
            check(format!("/sidecars/{i}/health/interval"), &h.interval);
            check(format!("/sidecars/{i}/health/timeout"), &h.timeout);
        }
    }
    for (i, d) in stack.devices.iter().enumerate() {
        check(format!("/devices/{i}/expires"), &d.expires);
    }
}
