//! Lowering: the KDL document → a JSON value in the model's shape, plus where each value came
//! from. Node and property names are checked here (with "did you mean"); types, ranges and
//! patterns are left to the JSON Schema, whose errors find their way back through [`SpanMap`].

use std::collections::HashMap;

use kdl::{KdlDocument, KdlEntry, KdlNode, KdlValue};
use serde_json::{Map, Value};

use super::diagnostic::{Problem, Span, did_you_mean};

/// JSON pointer (`/sidecars/0/port`) → the span in stack.kdl it was lowered from.
#[derive(Debug, Clone, Default)]
pub struct SpanMap(HashMap<String, Span>);

impl SpanMap {
    /// The span of `pointer`, or of its nearest ancestor that has one.
    pub fn get(&self, pointer: &str) -> Span {
        let mut p = pointer;
        loop {
            if let Some(s) = self.0.get(p) {
                return *s;
            }
            match p.rfind('/') {
                Some(i) => p = &p[..i],
                None => return Span::default(),
            }
        }
    }

    fn insert(&mut self, pointer: String, span: Span) {
        self.0.insert(pointer, span);
    }
}

/// How a node's positional arguments lower.
#[derive(Clone, Copy)]
enum Args {
    /// No arguments.
    None,
    /// One field per argument; the first `required` are mandatory.
    Fields(&'static [&'static str], usize),
    /// Every argument, as one array (`command "a" "b"`, `order "lan" "tor"`).
    Rest,
}

/// Where a lowered node goes in its parent object.
#[derive(Clone, Copy)]
enum Place {
    /// `parent[key] = { fields… }`; the node may appear once.
    Object(&'static str),
    /// `parent[key].push({ fields… })`.
    Each(&'static str),
    /// `parent[key] = <the argument>`; the node may appear once.
    Value(&'static str),
}

/// The shape of one kind of node.
struct Shape {
    name: &'static str,
    args: Args,
    props: &'static [&'static str],
    children: &'static [Shape],
    into: Place,
    example: &'static str,
}

const fn value(name: &'static str, example: &'static str) -> Shape {
    Shape {
        name,
        args: Args::Fields(&[""], 1),
        props: &[],
        children: &[],
        into: Place::Value(name),
        example,
    }
}

const SIDECAR: &[Shape] = &[
    value("image", "image \"ghcr.io/example/notes:1.4\""),
    value("port", "port 8080"),
    Shape {
        name: "command",
        args: Args::Rest,
        props: &[],
        children: &[],
        into: Place::Value("command"),
        example: "command \"serve\" \"--port=8080\"",
    },
    Shape {
        name: "env",
        args: Args::Fields(&["name", "value"], 1),
        props: &["file", "from-env"],
        children: &[],
        into: Place::Each("env"),
        example: "env \"TZ\" \"Europe/Berlin\"",
    },
    Shape {
        name: "volume",
        args: Args::Fields(&["source", "target"], 2),
        props: &["read-only", "external"],
        children: &[],
        into: Place::Each("volumes"),
        example: "volume \"notes-data\" \"/data\"",
    },
    Shape {
        name: "health",
        args: Args::Fields(&["url"], 0),
        props: &["cmd", "interval", "timeout", "retries"],
        children: &[],
        into: Place::Object("health"),
        example: "health \"http://127.0.0.1:8080/healthz\" interval=\"10s\"",
    },
    value("lan-port", "lan-port 8444"),
];

const OVERLAY_CHILDREN: &[Shape] = &[
    value("userspace", "userspace #true"),
    value("hostname", "hostname \"home-notes\""),
    value("image", "image \"tailscale/tailscale:stable\""),
    value("tags", "tags \"tag:soul\""),
];

const TRANSPORT: &[Shape] = &[
    Shape {
        name: "order",
        args: Args::Rest,
        props: &[],
        children: &[],
        into: Place::Value("order"),
        example: "order \"lan\" \"tailscale\" \"relay\"",
    },
    value("browser", "browser \"tailscale\""),
    Shape {
        name: "lan",
        args: Args::None,
        props: &["port", "address"],
        children: &[],
        into: Place::Object("lan"),
        example: "lan port=8443",
    },
    Shape {
        name: "tailscale",
        args: Args::None,
        props: &["authkey-file", "tags", "hostname", "image", "userspace"],
        children: OVERLAY_CHILDREN,
        into: Place::Object("tailscale"),
        example: "tailscale authkey-file=\"/run/secrets/ts\"",
    },
    Shape {
        name: "headscale",
        args: Args::None,
        props: &[
            "url",
            "authkey-file",
            "tags",
            "hostname",
            "image",
            "userspace",
        ],
        children: OVERLAY_CHILDREN,
        into: Place::Object("headscale"),
        example: "headscale url=\"https://hs.example.com\" authkey-file=\"/run/secrets/hs\"",
    },
    Shape {
        name: "nebula",
        args: Args::None,
        props: &[
            "lighthouse",
            "lighthouse-ip",
            "ip",
            "ca-file",
            "cert-file",
            "key-file",
            "image",
        ],
        children: &[],
        into: Place::Object("nebula"),
        example: "nebula lighthouse=\"203.0.113.7:4242\" lighthouse-ip=\"10.42.0.1\" ip=\"10.42.0.2/24\" ca-file=… cert-file=… key-file=…",
    },
    Shape {
        name: "tor",
        args: Args::None,
        props: &["image"],
        children: &[],
        into: Place::Object("tor"),
        example: "tor",
    },
];

const TOP: &[Shape] = &[
    value("stack", "stack \"home\""),
    Shape {
        name: "sidecar",
        args: Args::Fields(&["name"], 1),
        props: &[],
        children: SIDECAR,
        into: Place::Each("sidecars"),
        example: "sidecar \"notes\" { image \"…\"; port 8080 }",
    },
    Shape {
        name: "gate",
        args: Args::None,
        props: &["port", "tls-only"],
        children: &[],
        into: Place::Object("gate"),
        example: "gate port=8443",
    },
    Shape {
        name: "transport",
        args: Args::None,
        props: &[],
        children: TRANSPORT,
        into: Place::Object("transport"),
        example: "transport { lan port=8443 }",
    },
    Shape {
        name: "relay",
        args: Args::Fields(&["endpoint"], 1),
        props: &["pin", "token-file", "public", "domain"],
        children: &[],
        into: Place::Object("relay"),
        example: "relay \"relay.example.com:7000\" pin=\"sha256//…\"",
    },
    Shape {
        name: "acme",
        args: Args::None,
        props: &["directory", "ca-file", "contact"],
        children: &[],
        into: Place::Object("acme"),
        example: "acme directory=\"https://acme-v02.api.letsencrypt.org/directory\"",
    },
    value("secret-generation", "secret-generation 1"),
    Shape {
        name: "device",
        args: Args::Fields(&["name"], 1),
        props: &["expires", "generation"],
        children: &[],
        into: Place::Each("devices"),
        example: "device \"alice-phone\"",
    },
];

/// Property names that would put a secret in git, whatever node they are on.
const SECRET_PROPS: &[&str] = &["authkey", "auth-key", "token", "password", "secret", "key"];

/// The example for the node at `pointer`'s field, for hints about missing fields.
pub fn example_for(field: &str) -> Option<&'static str> {
    fn find(shapes: &'static [Shape], field: &str) -> Option<&'static str> {
        shapes.iter().find_map(|s| {
            let key = match s.into {
                Place::Object(k) | Place::Each(k) | Place::Value(k) => k,
            };
            if key == field || s.name == field {
                Some(s.example)
            } else {
                find(s.children, field)
            }
        })
    }
    find(TOP, field)
}

/// Lowers a parsed document. Problems with node and property names are appended to `problems`;
/// the offending nodes or properties are left out of the result.
pub fn lower(doc: &KdlDocument, problems: &mut Vec<Problem>) -> (Value, SpanMap) {
    let mut spans = SpanMap::default();
    let mut root = Map::new();
    spans.insert(String::new(), Span::new(0, 0));
    lower_children(doc, TOP, "", "", &mut root, &mut spans, problems);
    (Value::Object(root), spans)
}

fn lower_children(
    doc: &KdlDocument,
    shapes: &'static [Shape],
    parent_name: &str,
    pointer: &str,
    obj: &mut Map<String, Value>,
    spans: &mut SpanMap,
    problems: &mut Vec<Problem>,
) {
    let mut seen: std::collections::HashSet<&str> = std::collections::HashSet::new();
    for node in doc.nodes() {
        let name = node.name().value();
        let name_span = Span::from(node.name().span());
        let Some(shape) = shapes.iter().find(|s| s.name == name) else {
            problems.push(unknown_node(name, name_span, parent_name, shapes));
            continue;
        };
        if let Place::Object(_) | Place::Value(_) = shape.into {
            if seen.contains(name) {
                problems.push(
                    Problem::new(name_span, format!("`{name}` may appear only once here"))
                        .label("second one")
                        .help("remove this one or merge it into the first"),
                );
                continue;
            }
            seen.insert(shape.name);
        }
        lower_node(node, shape, pointer, obj, spans, problems);
    }
}

fn unknown_node(name: &str, span: Span, parent: &str, shapes: &'static [Shape]) -> Problem {
    let names: Vec<&str> = shapes.iter().map(|s| s.name).collect();
    let place = if parent.is_empty() {
        "at the top level".to_string()
    } else {
        format!("inside `{parent}`")
    };
    let mut p = Problem::new(span, format!("unknown node `{name}` {place}")).label("not known");
    p = match did_you_mean(name, &names) {
        Some(s) => p.help(format!("did you mean `{s}`?")),
        None => p.help(format!("known here: {}", names.join(", "))),
    };
    p
}

fn lower_node(
    node: &KdlNode,
    shape: &Shape,
    pointer: &str,
    parent: &mut Map<String, Value>,
    spans: &mut SpanMap,
    problems: &mut Vec<Problem>,
) {
    let name_span = Span::from(node.name().span());
    let (key, here) = match shape.into {
        Place::Object(k) | Place::Value(k) => (k, format!("{pointer}/{k}")),
        Place::Each(k) => {
            let n = parent
                .get(k)
                .and_then(Value::as_array)
                .map_or(0, |a| a.len());
            (k, format!("{pointer}/{k}/{n}"))
        }
    };
    spans.insert(here.clone(), name_span);

    let args: Vec<&KdlEntry> = node
        .entries()
        .iter()
        .filter(|e| e.name().is_none())
        .collect();
    let props: Vec<&KdlEntry> = node
        .entries()
        .iter()
        .filter(|e| e.name().is_some())
        .collect();

    if let Place::Value(_) = shape.into {
        let v = match shape.args {
            Args::Rest => Value::Array(args.iter().map(|e| json_of(e.value())).collect()),
            _ => match args.as_slice() {
                [one] => {
                    check_literal_secret(one, problems);
                    json_of(one.value())
                }
                [] => {
                    problems.push(
                        Problem::new(name_span, format!("`{}` needs a value", shape.name))
                            .help(format!("write it as `{}`", shape.example)),
                    );
                    return;
                }
                [_, extra, ..] => {
                    problems.push(
                        Problem::new(Span::from(extra.span()), "unexpected extra argument")
                            .help(format!("write it as `{}`", shape.example)),
                    );
                    return;
                }
            },
        };
        if let Args::Rest = shape.args {
            for (i, e) in args.iter().enumerate() {
                spans.insert(format!("{here}/{i}"), Span::from(e.span()));
            }
        } else if let Some(e) = args.first() {
            spans.insert(here.clone(), Span::from(e.span()));
        }
        for p in &props {
            problems.push(unknown_prop(p, shape));
        }
        if let Some(children) = node.children() {
            problems.push(
                Problem::new(
                    Span::from(children.span()),
                    format!("`{}` takes no children block", shape.name),
                )
                .help(format!("write it as `{}`", shape.example)),
            );
        }
        parent.insert(key.to_string(), v);
        return;
    }

    let mut obj = Map::new();
    match shape.args {
        Args::None | Args::Rest => {
            if let Some(extra) = args.first() {
                problems.push(
                    Problem::new(
                        Span::from(extra.span()),
                        format!("`{}` takes no arguments", shape.name),
                    )
                    .help(format!("write it as `{}`", shape.example)),
                );
            }
        }
        Args::Fields(fields, required) => {
            if args.len() < required {
                let missing = fields[args.len()];
                problems.push(
                    Problem::new(name_span, format!("`{}` needs its {missing}", shape.name))
                        .help(format!("write it as `{}`", shape.example)),
                );
            }
            for (i, e) in args.iter().enumerate() {
                match fields.get(i) {
                    Some(field) => {
                        check_literal_secret(e, problems);
                        obj.insert(field.to_string(), json_of(e.value()));
                        spans.insert(format!("{here}/{field}"), Span::from(e.span()));
                    }
                    None => problems.push(
                        Problem::new(Span::from(e.span()), "unexpected extra argument")
                            .help(format!("write it as `{}`", shape.example)),
                    ),
                }
            }
        }
    }
    for p in props {
        let pname = p.name().map(|n| n.value()).unwrap_or_default();
        if !shape.props.contains(&pname) {
            problems.push(unknown_prop(p, shape));
            continue;
        }
        check_literal_secret(p, problems);
        obj.insert(pname.to_string(), json_of(p.value()));
        spans.insert(format!("{here}/{pname}"), Span::from(p.span()));
    }
    if let Some(children) = node.children() {
        if shape.children.is_empty() {
            problems.push(
                Problem::new(
                    Span::from(children.span()),
                    format!("`{}` takes no children block", shape.name),
                )
                .help(format!("write it as `{}`", shape.example)),
            );
        } else {
            lower_children(
                children,
                shape.children,
                shape.name,
                &here,
                &mut obj,
                spans,
                problems,
            );
        }
    }

    match shape.into {
        Place::Each(_) => {
            let list = parent
                .entry(key.to_string())
                .or_insert_with(|| Value::Array(Vec::new()));
            if let Value::Array(a) = list {
                a.push(Value::Object(obj));
            }
        }
        _ => {
            parent.insert(key.to_string(), Value::Object(obj));
        }
    }
}

fn unknown_prop(entry: &KdlEntry, shape: &Shape) -> Problem {
    let pname = entry.name().map(|n| n.value()).unwrap_or_default();
    let span = Span::from(entry.span());
    if SECRET_PROPS.contains(&pname) {
        let file_form = if shape.props.iter().any(|p| *p == format!("{pname}-file")) {
            format!("{pname}-file")
        } else if let Some(f) = shape.props.iter().find(|p| p.ends_with("-file")) {
            f.to_string()
        } else {
            format!("{pname}-file")
        };
        return Problem::new(
            span,
            format!("`{pname}=` would put a secret in stack.kdl, which is committed to git"),
        )
        .label("literal secret")
        .help(format!(
            "keep the secret in a file on the machine and use {file_form}=\"/run/secrets/…\""
        ));
    }
    let mut p = Problem::new(
        span,
        format!("unknown property `{pname}=` on `{}`", shape.name),
    )
    .label("not known");
    p = match did_you_mean(pname, shape.props) {
        Some(s) => p.help(format!("did you mean `{s}=`?")),
        None if shape.props.is_empty() => p.help(format!(
            "`{}` takes no properties; write it as `{}`",
            shape.name, shape.example
        )),
        None => p.help(format!("known here: {}", shape.props.join(", "))),
    };
    p
}

/// A literal that looks like a Tailscale auth key is rejected wherever it appears.
fn check_literal_secret(entry: &KdlEntry, problems: &mut Vec<Problem>) {
    if let Some(s) = entry.value().as_string()
        && s.starts_with("tskey-")
    {
        problems.push(
            Problem::new(Span::from(entry.span()), "this looks like a Tailscale auth key written into stack.kdl")
                .label("literal secret")
                .help("stack.kdl is committed to git: keep the key in a file on the machine and use authkey-file=\"/run/secrets/ts\" (or, for env, file=\"…\")"),
        );
    }
}

fn json_of(v: &KdlValue) -> Value {
    match v {
        KdlValue::String(s) => Value::String(s.clone()),
        KdlValue::Integer(i) => match i64::try_from(*i) {
            Ok(i) => Value::from(i),
            Err(_) => Value::String(i.to_string()),
        },
        KdlValue::Float(f) => serde_json::Number::from_f64(*f)
            .map(Value::Number)
            .unwrap_or(Value::Null),
        KdlValue::Bool(b) => Value::Bool(*b),
        KdlValue::Null => Value::Null,
    }
}
