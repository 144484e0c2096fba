//! The typed model of stack.kdl and everything needed to get one from a file: KDL parsing with
//! spans, lowering to the model's JSON shape, JSON Schema validation, the semantic rules, and
//! located diagnostics. Imports nothing else of soul's.

mod diagnostic;
pub mod edit;
pub mod init;
mod lower;
mod model;
mod rules;
mod source;

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use kdl::KdlDocument;
use serde_json::Value;

pub use diagnostic::{Diagnostics, MAX_RENDERED, Problem, Span, did_you_mean, line_col};
pub use model::*;
pub use source::{MAX_FILE_BYTES, MAX_NESTING, read as read_source, write as write_source};

/// Why a stack file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum StackError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The path names a directory, a FIFO, a device or anything else that is not a file.
    #[error("{path} is not a regular file: name the stack.kdl file itself")]
    NotAFile { path: PathBuf },
    /// The file is larger than any stack soul reads.
    #[error(
        "{path} is larger than {limit} bytes, far more than any stack.kdl needs: is it the right file?"
    )]
    TooLarge { path: PathBuf, limit: u64 },
    /// The file was read but is not a valid stack; every problem found is inside.
    #[error("{0}")]
    Invalid(Diagnostics),
}

/// Reads and validates a stack file.
pub fn load(path: &Path) -> Result<Stack, StackError> {
    let source = read_source(path)?;
    let mut stack = parse(&path.display().to_string(), &source).map_err(StackError::Invalid)?;
    stack.lock_file = Some(lock_file_of(path));
    Ok(stack)
}

/// The lock file of the stack file at `path`: `stack.lock` beside `stack.kdl` (`home.lock`
/// beside `home.kdl`).
pub fn lock_file_of(path: &Path) -> std::path::PathBuf {
    path.with_extension("lock")
}

/// Parses and validates stack.kdl source: KDL syntax, then the JSON Schema, then the semantic
/// rules. Every problem found is reported, not only the first.
pub fn parse(path: &str, source: &str) -> Result<Stack, Diagnostics> {
    let invalid = |mut problems: Vec<Problem>| Diagnostics {
        problems: {
            problems.sort_by_key(|p| p.span.offset);
            problems
        },
        path: path.to_string(),
        source: Arc::new(source.to_string()),
    };
    let doc = document(source).map_err(invalid)?;
    let mut problems = Vec::new();
    let (value, spans) = lower::lower(&doc, &mut problems);
    problems.extend(schema_problems(&value, &spans));
    if !problems.is_empty() {
        return Err(invalid(problems));
    }
    // The schema cannot say everything the model's types do (`port 80.0`, a count past u32):
    // such an error is reported where its value is.
    let stack: Stack = match serde_path_to_error::deserialize(value) {
        Ok(s) => s,
        Err(e) => {
            let pointer = pointer_of(e.path());
            let message = schema_message(&pointer, &e.into_inner().to_string());
            return Err(invalid(vec![Problem::new(spans.get(&pointer), message)]));
        }
    };
    let problems = rules::check(&stack, &spans);
    if problems.is_empty() {
        Ok(stack)
    } else {
        Err(invalid(problems))
    }
}

/// The KDL parser's own stack.
const PARSER_STACK: usize = 64 * 1024 * 1024;

/// KDL's syntax tree of `source`, once its nesting is known to be within [`MAX_NESTING`] (the
/// parser recurses, and would overflow the stack on a file of nothing but `{`).
pub(crate) fn document(source: &str) -> Result<KdlDocument, Vec<Problem>> {
    if let Some(p) = source::too_deep(source) {
        return Err(vec![p]);
    }
    // The parser recurses: give it a stack of its own, roomier than a tokio worker's or a test
    // thread's 2 MiB, so what the nesting bound lets through always fits.
    let parsed = std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("kdl-parse".into())
            .stack_size(PARSER_STACK)
            .spawn_scoped(scope, || KdlDocument::parse_v2(source))
            .map(|t| t.join())
    });
    let parsed = match parsed {
        Ok(Ok(parsed)) => parsed,
        _ => {
            return Err(vec![
                Problem::new(Span::default(), "the KDL parser failed on this file")
                    .help("this is a bug in soul; please report it with the file"),
            ]);
        }
    };
    parsed.map_err(|e| {
        e.diagnostics
            .iter()
            .map(|d| {
                let mut p = Problem::new(
                    Span::from(d.span),
                    d.message.clone().unwrap_or_else(|| "invalid KDL".into()),
                );
                p.label = d.label.clone();
                p.help = Some(d.help.clone().unwrap_or_else(|| {
                    "stack.kdl is KDL 2.0: strings in double quotes, booleans as #true/#false"
                        .into()
                }));
                p
            })
            .collect()
    })
}

/// The stack name a source declares, even when it is otherwise invalid.
pub fn declared_name(source: &str) -> Option<String> {
    let doc = document(source).ok()?;
    let node = doc.nodes().iter().find(|n| n.name().value() == "stack")?;
    node.entries()
        .first()?
        .value()
        .as_string()
        .map(String::from)
}

/// `sidecars[0].health.retries` → `/sidecars/0/health/retries`.
fn pointer_of(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    path.iter()
        .filter_map(|s| match s {
            Segment::Seq { index } => Some(format!("/{index}")),
            Segment::Map { key } => Some(format!("/{key}")),
            Segment::Enum { variant } => Some(format!("/{variant}")),
            Segment::Unknown => None,
        })
        .collect()
}

/// The JSON Schema of the model, as committed in `schema/stack.schema.json`.
pub fn schema() -> &'static Value {
    static SCHEMA: OnceLock<Value> = OnceLock::new();
    SCHEMA.get_or_init(|| {
        let mut v = serde_json::to_value(schemars::schema_for!(Stack)).unwrap_or(Value::Null);
        if let Value::Object(m) = &mut v {
            m.insert(
                "$comment".into(),
                Value::String(
                    "Generated by `soul schema` from soul's Rust model; stack.kdl is lowered to this shape (node arguments become the named fields) before validation.".into(),
                ),
            );
        }
        v
    })
}

/// `soul schema`'s output: the schema, pretty-printed, with a trailing newline.
pub fn schema_json() -> String {
    let mut s = serde_json::to_string_pretty(schema()).unwrap_or_default();
    s.push('\n');
    s
}

fn schema_problems(value: &Value, spans: &lower::SpanMap) -> Vec<Problem> {
    static VALIDATOR: OnceLock<Option<jsonschema::Validator>> = OnceLock::new();
    let Some(validator) = VALIDATOR.get_or_init(|| jsonschema::validator_for(schema()).ok()) else {
        return vec![
            Problem::new(Span::default(), "soul's own JSON Schema failed to compile")
                .help("this is a bug in soul; please report it"),
        ];
    };
    validator
        .iter_errors(value)
        .map(|e| {
            let pointer = e.instance_path().as_str().to_string();
            // Values under `env` may be secrets: say what is wrong without echoing them.
            let message = if pointer.contains("/env/") {
                e.masked().to_string()
            } else {
                e.to_string()
            };
            let mut p = Problem::new(spans.get(&pointer), schema_message(&pointer, &message));
            p.help = schema_hint(&pointer, e.kind());
            p
        })
        .collect()
}

/// Names the field in KDL terms: `/sidecars/0/port` → "`port` of sidecar #1".
fn schema_message(pointer: &str, message: &str) -> String {
    let parts: Vec<&str> = pointer.split('/').filter(|p| !p.is_empty()).collect();
    let place = match parts.as_slice() {
        [] => String::new(),
        [field] => format!("`{field}`: "),
        ["sidecars", i, rest @ ..] | ["devices", i, rest @ ..] => {
            let kind = if parts[0] == "sidecars" {
                "sidecar"
            } else {
                "device"
            };
            let n = i.parse::<usize>().map_or(0, |n| n + 1);
            if rest.is_empty() {
                format!("{kind} #{n}: ")
            } else {
                format!("`{}` of {kind} #{n}: ", rest.join(" "))
            }
        }
        other => format!("`{}`: ", other.join(" ")),
    };
    format!("{place}{message}")
}

fn schema_hint(pointer: &str, kind: &jsonschema::error::ValidationErrorKind) -> Option<String> {
    use jsonschema::error::ValidationErrorKind as K;
    let field = pointer.rsplit('/').next().unwrap_or("");
    match kind {
        K::Required { property } => {
            let name = property.as_str().unwrap_or_default();
            let example = lower::example_for(name).unwrap_or(name);
            Some(format!("add `{example}`"))
        }
        K::Pattern { pattern } if pattern == NAME_PATTERN => Some(
            "names start with a lowercase letter, then lowercase letters, digits or `-`, at most 32 characters".into(),
        ),
        K::Pattern { pattern } if pattern == DURATION_PATTERN => {
            Some("durations look like \"500ms\", \"10s\", \"5m\", \"2h\" or \"90d\"".into())
        }
        K::Minimum { .. } | K::Maximum { .. } if field.contains("port") => {
            Some("ports are 1–65535".into())
        }
        K::Type { .. } => lower::example_for(field)
            .or_else(|| lower::example_for(pointer.split('/').rev().nth(1).unwrap_or("")))
            .map(|e| format!("write it as `{e}`")),
        K::Enum { .. } => Some(format!(
            "transports are {}",
            TransportKind::ALL.map(|k| k.as_str()).join(", ")
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
