//! Parsing and validation, as a table of files → model or located problems.

use super::*;
use proptest::strategy::Strategy;

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

relay "relay.example.com:7000" pin="sha256//YhKJKSzoTt2b5FP18fvpHo7fJYqQCjAa3HWY3tvRMwE=" token-file="/run/secrets/relay"
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
        (
            "sidecar \"x\" { image \"i\"; port 80; }\ntransport { browser \"tailscale\"; lan; }\n",
            "`browser` names `tailscale`, which is not declared",
        ),
        (
            "sidecar \"x\" { image \"i\"; port 80; }\nrelay \"r.example:443\" pin=\"sha256//YhKJKSzoTt2b5FP18fvpHo7fJYqQCjAa3HWY3tvRMwE=\"\ntransport { browser \"relay\"; lan; }\n",
            "cannot pair through the relay",
        ),
        (
            "sidecar \"x\" { image \"i\"; port 80; }\nrelay \"r.example:443\" pin=\"sha256//YhKJKSzoTt2b5FP18fvpHo7fJYqQCjAa3HWY3tvRMwE=\" public=#true\ntransport { browser \"lan\"; lan; }\n",
            "no effect: the stack has a public name",
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

/// The widest line of a rendering, in characters.
fn widest_line(out: &str) -> usize {
    out.lines().map(|l| l.chars().count()).max().unwrap_or(0)
}

#[test]
fn error_past_column_65535_renders_without_panic() {
    let src = format!("{}x", "\t".repeat(16_384 * 4));
    let d = parse("stack.kdl", &src).expect_err("invalid");
    let out = d.render(false);
    assert!(out.contains("stack.kdl:1:65537"), "{out}");
    assert!(widest_line(&out) <= diagnostic::MAX_EXCERPT + 40, "{out}");
}

#[test]
fn deep_nesting_is_an_error_not_a_stack_overflow() {
    for src in [
        "a{".repeat(1_270),
        "{ n".repeat(1_268),
        format!("stack \"a\"\n{}", "/*".repeat(3_591)),
        format!("x {}", "{ n ".repeat(100_000)),
    ] {
        let d = parse("stack.kdl", &src).expect_err("invalid");
        assert!(
            d.problems[0].message.contains("nest more than"),
            "{:?}",
            d.problems[0]
        );
        assert!(d.render(false).contains("stack.kdl:"));
        assert_eq!(declared_name(&src), None);
    }
}

#[test]
fn unclosed_slashdash_blocks_do_not_take_exponential_time() {
    // Found by the fuzz test below: each level doubled the KDL parser's work.
    let src = "\n/-{/**/'//x".repeat(40);
    let started = std::time::Instant::now();
    let d = parse("stack.kdl", &src).expect_err("invalid");
    assert!(
        d.problems[0].message.contains("nest more than"),
        "{:?}",
        d.problems
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
}

#[test]
fn ten_thousand_errors_render_the_first_fifty_and_a_count() {
    let src = format!("stack \"a\"\n{}", "bogus 1\n".repeat(10_000));
    let d = parse("stack.kdl", &src).expect_err("invalid");
    let out = d.render(false);
    assert!(out.contains("… and "), "{}", &out[out.len() - 200..]);
    assert!(
        out.lines().count() < MAX_RENDERED * 10,
        "{} lines",
        out.lines().count()
    );
}

#[test]
fn float_port_is_reported_at_its_own_position() {
    let (l, c, msg, _) =
        one_problem("stack \"a\"\nsidecar \"x\" {\n    image \"i\"\n    port 80.0\n}\n");
    assert_eq!((l, c), (4, 10), "{msg}");
    assert!(msg.contains("port"), "{msg}");
}

#[test]
fn retries_past_u32_is_reported_at_its_own_position() {
    let (l, c, msg, _) = one_problem(
        "stack \"a\"\nsidecar \"x\" {\n    image \"i\"\n    port 80\n    health cmd=\"true\" retries=4294967296\n}\n",
    );
    assert_eq!(l, 5, "{msg}");
    assert!(c > 5, "{msg} at column {c}");
    assert!(msg.contains("retries"), "{msg}");
}

proptest::proptest! {
    // A fixed seed: CI runs the same 1,000 files every time (a new one found locally goes into
    // a regression test named after it).
    #![proptest_config(proptest::prelude::ProptestConfig {
        cases: 1_000,
        rng_seed: proptest::test_runner::RngSeed::Fixed(0x5001),
        ..proptest::prelude::ProptestConfig::default()
    })]

    /// Files stitched from KDL's delicate pieces (and the pieces of a real stack) never panic
    /// the parser or the renderer, every problem points into the file, and the rendering stays
    /// bounded in lines and width whatever the input.
    #[test]
    fn any_file_parses_or_fails_with_located_bounded_errors(
        pieces in proptest::collection::vec(
            proptest::prop_oneof![
                proptest::sample::select(vec![
                    "{", "}", "/*", "*/", "//", "\"", "#\"", "\"#", "\"\"\"", "\\", "\n", "\t",
                    " ", ";", "=", "#true", "#null", "80.0", "4294967296", "-1", "é", "\r\n",
                    "/-", "(t)", "stack \"a\"\n", "sidecar \"x\" { image \"i\"; port 80; }\n",
                    "device \"d\" expires=\"1s\"\n", "transport { lan port=8443; }\n",
                    "env \"A\" \"\\u{0}\"", "volume \"v\" \"/\"", "health interval=\"106752d\"",
                ]).prop_map(String::from),
                "[ -~]{0,12}",
            ],
            0..200,
        ),
        repeat in 1usize..40,
    ) {
        let src = pieces.concat().repeat(repeat);
        if let Err(d) = parse("stack.kdl", &src) {
            proptest::prop_assert!(!d.problems.is_empty());
            for p in &d.problems {
                proptest::prop_assert!(p.span.offset <= src.len(), "{p:?}");
            }
            let out = d.render(false);
            proptest::prop_assert!(widest_line(&out) <= diagnostic::MAX_MESSAGE + 20);
            proptest::prop_assert!(out.lines().count() <= MAX_RENDERED * 12 + 2);
        }
    }
}

#[test]
fn inputs_docker_would_refuse_are_caught_at_their_node() {
    let base = "stack \"a\"\nsidecar \"x\" {\n    image \"i\"\n    port 80\n";
    for (what, body, line, expected) in [
        (
            "health interval past i64 ns",
            "    health cmd=\"true\" interval=\"106752d\"\n",
            5,
            "between 1ms and 24h",
        ),
        ("NUL in env", "    env \"A\" \"x\\u{0}y\"\n", 5, "NUL"),
        ("NUL in command", "    command \"a\\u{0}\"\n", 5, "NUL"),
        (
            "same target twice",
            "    volume \"a\" \"/data\"\n    volume \"b\" \"/data/\"\n",
            6,
            "mounted at",
        ),
        ("target /", "    volume \"a\" \"/\"\n", 5, "over `/`"),
        (
            "256-character volume name",
            &format!("    volume \"{}\" \"/data\"\n", "v".repeat(256)),
            5,
            "at most 128",
        ),
        (
            "external host path",
            "    volume \"/srv\" \"/data\" external=#true\n",
            5,
            "only a named volume",
        ),
    ] {
        let src = format!("{base}{body}}}\n");
        let ps = problems(&src);
        assert!(
            ps.iter()
                .any(|(l, _, m, _)| *l == line && m.contains(expected)),
            "{what}: {ps:#?}"
        );
    }
}

/// The Tailscale client's rules, as its documentation and containerboot state them: `tailscale
/// up --advertise-tags` takes comma-separated `tag:<name>` (a letter, then letters, digits and
/// `-`), and containerboot splits `TS_EXTRA_ARGS` on whitespace; a hostname is one DNS label.
#[test]
fn tailnet_tags_and_hostnames_the_tailscale_client_would_refuse_are_refused_at_their_position() {
    for good in ["tag:soul", "tag:soul,tag:home-2", "tag:A1"] {
        assert_eq!(tailscale_tags_problem(good), None, "{good}");
    }
    for bad in [
        "tag:a, tag:b",
        "tag:a ,tag:b",
        "soul",
        "tag:",
        "tag:1a",
        "tag:a_b",
        "tag:a,",
    ] {
        assert!(tailscale_tags_problem(bad).is_some(), "{bad}");
    }
    assert!(
        tailscale_tags_problem("tag:a, tag:b")
            .unwrap()
            .contains("`tag:a,tag:b`")
    );
    for good in ["home-notes", "TV", "a", &"a".repeat(63)] {
        assert!(is_tailnet_hostname(good), "{good}");
    }
    for bad in ["My TV!", "tv-", "-tv", "", "a.b", &"a".repeat(64)] {
        assert!(!is_tailnet_hostname(bad), "{bad}");
    }
    let base = "stack \"home\"\nsidecar \"x\" { image \"i\"; port 80; }\n";
    for (body, line, expected) in [
        (
            "transport {\n    tailscale tags=\"tag:a, tag:b\"\n}\n",
            4,
            "would refuse these tags",
        ),
        (
            "transport {\n    tailscale hostname=\"My TV!\"\n}\n",
            4,
            "not a hostname",
        ),
        (
            "transport {\n    headscale url=\"https://hs\" {\n        hostname \"tv-\"\n    }\n}\n",
            5,
            "not a hostname",
        ),
    ] {
        let ps = problems(&format!("{base}{body}"));
        assert!(
            ps.iter()
                .any(|(l, _, m, _)| *l == line && m.contains(expected)),
            "{body}: {ps:#?}"
        );
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig {
        cases: 512,
        rng_seed: proptest::test_runner::RngSeed::Fixed(0x7a11),
        ..proptest::prelude::ProptestConfig::default()
    })]

    /// Every stack and sidecar name the format allows gives a default tailnet hostname the
    /// Tailscale client takes, and two different pairs give two different hostnames.
    #[test]
    fn every_default_tailnet_hostname_is_a_valid_dns_label(
        stack in "[a-z][a-z0-9-]{0,31}",
        sidecar in "[a-z][a-z0-9-]{0,31}",
        other in "[a-z][a-z0-9-]{0,31}",
    ) {
        let name = default_tailnet_hostname(&stack, &sidecar);
        proptest::prop_assert!(is_tailnet_hostname(&name), "{}", name);
        if other != sidecar {
            proptest::prop_assert_ne!(name, default_tailnet_hostname(&stack, &other));
        }
    }
}
