//! Parsing and validation, as a table of files → model or located problems.

use super::*;

const FULL: &str = r#"
// a comment
stack "home"

sidecar "notes" {
    image "ghcr.io/example/notes:1.4"
    port 8080
    command "serve" "--port=8080"
    env "TZ" "Europe/Berlin"
    env "DB_PASSWORD" file="/run/secrets/db"
    env "API_KEY" from-env="NOTES_API_KEY"
    volume "notes-data" "/data"
    volume "/srv/notes/media" "/media" read-only=#true
    health "http://127.0.0.1:8080/healthz" interval="10s" timeout="2s" retries=3
}

gate port=8443

transport {
    order "lan" "tailscale" "relay"
    lan port=8443
    tailscale authkey-file="/run/secrets/ts" tags="tag:soul" {
        userspace #false
    }
}

relay "relay.example.com:7000" token-file="/run/secrets/relay"
secret-generation 1
device "alice-phone"
device "work-laptop" expires="90d" generation=2
"#;

/// The problems of an invalid file as `(line, column, message, help)`.
fn problems(src: &str) -> Vec<(usize, usize, String, String)> {
    let d = parse("stack.kdl", src).expect_err("file should be invalid");
    d.problems
        .iter()
        .map(|p| {
            let (l, c) = d.line_col(p.span.offset);
            (l, c, p.message.clone(), p.help.clone().unwrap_or_default())
        })
        .collect()
}

fn one_problem(src: &str) -> (usize, usize, String, String) {
    let mut ps = problems(src);
    assert_eq!(ps.len(), 1, "expected one problem, got {ps:#?}");
    ps.remove(0)
}

#[test]
fn the_format_example_parses_to_the_model() {
    let s = parse("stack.kdl", FULL).unwrap_or_else(|d| panic!("{d}"));
    assert_eq!(s.stack, "home");
    let notes = &s.sidecars[0];
    assert_eq!(notes.port, 8080);
    assert_eq!(
        notes.command.as_deref(),
        Some(&["serve".to_string(), "--port=8080".into()][..])
    );
    assert_eq!(notes.env[1].source(), EnvSource::File("/run/secrets/db"));
    assert_eq!(notes.env[2].source(), EnvSource::FromEnv("NOTES_API_KEY"));
    assert!(notes.volumes[1].read_only && notes.volumes[1].is_bind());
    assert_eq!(notes.health.as_ref().and_then(|h| h.retries), Some(3));
    assert_eq!(
        s.transport_order(),
        vec![
            TransportKind::Lan,
            TransportKind::Tailscale,
            TransportKind::Relay
        ]
    );
    assert_eq!(s.devices[1].generation, 2);
    assert_eq!(s.devices[0].generation, 1);
    assert_eq!(s.lan_ports(), Some(vec![8443]));
}

#[test]
fn defaults_lan_only_and_ports_follow() {
    let s = parse(
        "s",
        "stack \"a\"\nsidecar \"x\" { image \"i\"; port 80; }\nsidecar \"y\" { image \"i\"; port 81; }\nsidecar \"z\" { image \"i\"; port 82; lan-port 9000; }",
    )
    .unwrap_or_else(|d| panic!("{d}"));
    assert_eq!(s.transport_order(), vec![TransportKind::Lan]);
    assert_eq!(s.lan_ports(), Some(vec![8443, 8444, 9000]));
    assert_eq!(s.gate.port, DEFAULT_GATE_PORT);
    assert_eq!(s.secret_generation, 1);
}

#[test]
fn kdl_syntax_error_is_located() {
    let (l, _, _, _) = one_problem("stack \"home\"\nsidecar \"x\" {\n  image \"unterminated\n}\n");
    assert!(l >= 3);
}

#[test]
fn unknown_node_suggests_the_close_name() {
    let (l, c, m, h) = one_problem(
        "stack \"home\"\nsidecar \"x\" { image \"i\"; port 80; }\ndevic \"alice-phone\"\n",
    );
    assert_eq!((l, c), (3, 1));
    assert!(m.contains("unknown node `devic`"), "{m}");
    assert_eq!(h, "did you mean `device`?");
}

#[test]
fn unknown_property_suggests_the_close_name() {
    let (l, c, m, h) = one_problem(
        "stack \"home\"\nsidecar \"x\" { image \"i\"; port 80; }\ndevice \"a\" generaton=2\n",
    );
    assert_eq!((l, c), (3, 12));
    assert!(m.contains("generaton"), "{m}");
    assert_eq!(h, "did you mean `generation=`?");
}

#[test]
fn literal_secrets_are_refused_with_the_file_form() {
    let (l, c, _, h) = one_problem(
        "stack \"home\"\nsidecar \"x\" { image \"i\"; port 80; }\ntransport {\n  tailscale authkey=\"abc\"\n}\n",
    );
    assert_eq!((l, c), (4, 13));
    assert!(h.contains("authkey-file="), "{h}");
    let (l, _, m, _) = one_problem(
        "stack \"home\"\nsidecar \"x\" { image \"i\"; port 80; env \"K\" \"tskey-auth-123\"; }\n",
    );
    assert_eq!(l, 2);
    assert!(m.contains("Tailscale auth key"), "{m}");
    let (_, _, m, h) = one_problem(
        "stack \"home\"\nsidecar \"x\" { image \"i\"; port 80; env \"DB_PASSWORD\" \"hunter2\"; }\n",
    );
    assert!(m.contains("secret"), "{m}");
    assert!(h.contains("file="), "{h}");
    let (_, _, _, h) = one_problem(
        "stack \"home\"\nsidecar \"x\" { image \"i\"; port 80; }\nrelay \"r:1\" token=\"abc\"\n",
    );
    assert!(h.contains("token-file="), "{h}");
}

#[test]
fn schema_errors_point_at_the_value() {
    let (l, c, m, h) =
        one_problem("stack \"home\"\nsidecar \"x\" {\n  image \"i\"\n  port 70000\n}\n");
    assert_eq!((l, c), (4, 8));
    assert!(m.contains("port") && m.contains("65535"), "{m}");
    assert_eq!(h, "ports are 1–65535");

    let (l, c, m, _) = one_problem("stack \"Home!\"\nsidecar \"x\" { image \"i\"; port 80; }\n");
    assert_eq!((l, c), (1, 7));
    assert!(m.contains("stack"), "{m}");

    let (l, _, m, h) = one_problem("stack \"home\"\nsidecar \"x\" {\n  port 80\n}\n");
    assert_eq!(l, 2);
    assert!(m.contains("image"), "{m}");
    assert!(h.contains("image \""), "{h}");

    let (_, _, m, _) =
        one_problem("stack \"home\"\nsidecar \"x\" { image \"i\"; port \"eighty\"; }\n");
    assert!(m.contains("integer"), "{m}");
}

#[test]
fn missing_stack_and_sidecars_are_both_reported() {
    let ps = problems("device \"a\"\n");
    assert_eq!(ps.len(), 2, "{ps:#?}");
    assert!(ps.iter().any(|p| p.2.contains("stack")));
    assert!(ps.iter().any(|p| p.2.contains("sidecars")));
}

#[test]
fn semantic_rules() {
    let base = "stack \"home\"\n";
    let cases: &[(&str, &str)] = &[
        (
            "sidecar \"x\" { image \"i\"; port 80; }\nsidecar \"x\" { image \"i\"; port 81; }\n",
            "declared twice",
        ),
        ("sidecar \"x\" { image \"i\"; port 8443; }\n", "gate's port"),
        (
            "sidecar \"x\" { image \"i\"; port 80; }\nsidecar \"y\" { image \"i\"; port 81; lan-port 8443; }\n",
            "LAN port 8443",
        ),
        (
            "sidecar \"x\" { image \"i\"; port 80; }\ntransport { order \"lan\" \"tor\"; lan; }\n",
            "not declared",
        ),
        (
            "sidecar \"x\" { image \"i\"; port 80; }\ntransport { tailscale; headscale url=\"https://h\"; }\n",
            "cannot both",
        ),
        (
            "sidecar \"x\" { image \"i\"; port 80; env \"A\" \"v\" file=\"/f\"; }\n",
            "exactly one",
        ),
        (
            "sidecar \"x\" { image \"i\"; port 80; health; }\n",
            "either a URL",
        ),
        (
            "sidecar \"x\" { image \"i\"; port 80; }\ndevice \"a\"\ndevice \"a\"\n",
            "declared twice",
        ),
        (
            "sidecar \"x\" { image \"i\"; port 80; }\ndevice \"a\" expires=\"9y\"\n",
            "does not match",
        ),
        (
            "sidecar \"x\" { image \"i\"; port 80; }\nstack \"again\"\n",
            "only once",
        ),
        (
            "sidecar \"x\" { image \"i\"; port 80; bogus 1; }\n",
            "unknown node",
        ),
        (
            "sidecar \"x\" { image \"i\"; port 80; }\ntransport { order \"lan\" \"carrier-pigeon\"; }\n",
            "carrier-pigeon",
        ),
    ];
    for (body, expect) in cases {
        let src = format!("{base}{body}");
        let ps = problems(&src);
        assert!(
            ps.iter().any(|p| p.2.contains(expect)),
            "for {body:?} expected a problem containing {expect:?}, got {ps:#?}"
        );
        for (l, c, _, _) in &ps {
            assert!(
                *l >= 2 && *c >= 1,
                "problem should point into the body: {ps:#?}"
            );
        }
    }
}

#[test]
fn every_error_is_reported_in_one_run() {
    let ps = problems(
        "stack \"home\"\nsidecar \"x\" { image \"i\"; port 70000; }\ndevic \"a\"\ngate prt=1\n",
    );
    assert_eq!(ps.len(), 3, "{ps:#?}");
}

#[test]
fn rendering_shows_file_line_column_source_and_caret() {
    let d = parse(
        "stack.kdl",
        "stack \"home\"\nsidecar \"x\" { image \"i\"; port 80; }\ndevic \"a\"\n",
    )
    .expect_err("invalid");
    let out = d.render(false);
    assert!(out.contains("stack.kdl:3:1"), "{out}");
    assert!(out.contains("devic \"a\""), "{out}");
    assert!(out.contains('^'), "{out}");
    assert!(out.contains("did you mean `device`?"), "{out}");
}

#[test]
fn bad_input_never_panics() {
    let samples = [
        "",
        "stack",
        "stack 1",
        "stack #null",
        "sidecar",
        "sidecar \"x\" 1 2 3 { }",
        "stack \"a\"\nsidecar \"x\" { image; port; command; env; volume; health 1 2; }",
        "transport { lan 1 { x } }",
        "gate port=-1",
        "device \"a\" generation=99999999999999999999999",
        "stack \"a\" { sidecar \"x\" }",
        "(t)stack \"a\"",
        "stack \"a\"\nsidecar \"x\" { port 1.5; image #true; }",
    ];
    for s in samples {
        let _ = parse("stack.kdl", s)
            .map(|_| ())
            .map_err(|d| d.render(false));
    }
}
