//! Diagnostics for stack.kdl: one located problem each, rendered with the source line and a
//! caret under the span (miette), and collected so `validate` reports every error in one run.

use std::fmt;
use std::sync::Arc;

use miette::{Diagnostic as MietteDiagnostic, GraphicalReportHandler, GraphicalTheme, SourceSpan};

/// A byte range in the stack file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Span {
    pub offset: usize,
    pub len: usize,
}

impl Span {
    pub fn new(offset: usize, len: usize) -> Self {
        Span { offset, len }
    }
}

impl From<SourceSpan> for Span {
    fn from(s: SourceSpan) -> Self {
        Span::new(s.offset(), s.len())
    }
}

impl From<Span> for SourceSpan {
    fn from(s: Span) -> Self {
        SourceSpan::new(s.offset.into(), s.len)
    }
}

/// One problem found in a stack file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub message: String,
    pub span: Span,
    pub label: Option<String>,
    pub help: Option<String>,
}

impl Problem {
    pub fn new(span: Span, message: impl Into<String>) -> Self {
        Problem {
            message: message.into(),
            span,
            label: None,
            help: None,
        }
    }

    pub fn label(mut self, label: impl Into<String>) -> Self {
        self.label = Some(label.into());
        self
    }

    pub fn help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }
}

/// Every problem found in one stack file, with the source they point into.
#[derive(Debug, Clone)]
pub struct Diagnostics {
    pub path: String,
    pub source: Arc<String>,
    pub problems: Vec<Problem>,
}

impl Diagnostics {
    /// `line:column` (1-based, columns in characters) of a byte offset.
    pub fn line_col(&self, offset: usize) -> (usize, usize) {
        line_col(&self.source, offset)
    }

    /// Renders every problem as `path:line:column`, the source line and a caret under the span.
    /// `color` picks the unicode, coloured theme for terminals; otherwise plain ASCII.
    pub fn render(&self, color: bool) -> String {
        let theme = if color {
            GraphicalTheme::unicode()
        } else {
            GraphicalTheme::none()
        };
        let handler = GraphicalReportHandler::new_themed(theme).with_width(100);
        let mut out = String::new();
        for problem in &self.problems {
            let report = Located {
                problem,
                source: miette::NamedSource::new(&self.path, self.source.clone()),
            };
            if handler.render_report(&mut out, &report).is_err() {
                let (line, col) = self.line_col(problem.span.offset);
                out.push_str(&format!(
                    "{}:{line}:{col}: {}\n",
                    self.path, problem.message
                ));
            }
            out.push('\n');
        }
        let n = self.problems.len();
        out.push_str(&format!(
            "{} is invalid: {n} error{}\n",
            self.path,
            if n == 1 { "" } else { "s" }
        ));
        out
    }
}

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.render(false))
    }
}

impl std::error::Error for Diagnostics {}

/// `line:column` (1-based) of a byte offset into `source`.
pub fn line_col(source: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(source.len());
    let before = source.get(..offset).unwrap_or(source);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let col = before[line_start..].chars().count() + 1;
    (line, col)
}

/// Adapts one [`Problem`] to miette for rendering.
struct Located<'a> {
    problem: &'a Problem,
    source: miette::NamedSource<Arc<String>>,
}

impl fmt::Debug for Located<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.problem.message)
    }
}

impl fmt::Display for Located<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.problem.message)
    }
}

impl std::error::Error for Located<'_> {}

impl MietteDiagnostic for Located<'_> {
    fn help<'b>(&'b self) -> Option<Box<dyn fmt::Display + 'b>> {
        self.problem
            .help
            .as_ref()
            .map(|h| Box::new(h) as Box<dyn fmt::Display>)
    }

    fn source_code(&self) -> Option<&dyn miette::SourceCode> {
        Some(&self.source)
    }

    fn labels(&self) -> Option<Box<dyn Iterator<Item = miette::LabeledSpan> + '_>> {
        let label = self.problem.label.clone().unwrap_or_else(|| "here".into());
        Some(Box::new(std::iter::once(
            miette::LabeledSpan::new_with_span(Some(label), self.problem.span),
        )))
    }
}

/// The closest of `candidates` to `word`, if it is close enough to be a likely typo.
pub fn did_you_mean<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|c| (edit_distance(word, c), *c))
        .filter(|(d, c)| *d <= (c.len().max(word.len()) / 3).max(1) || c.starts_with(word))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur.push((prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_counts_from_one_in_characters() {
        let src = "stack \"home\"\nsidecar \"é\" x\n";
        assert_eq!(line_col(src, 0), (1, 1));
        assert_eq!(line_col(src, 13), (2, 1));
        let x = src.find(" x").unwrap() + 1;
        assert_eq!(line_col(src, x), (2, 13));
    }

    #[test]
    fn suggests_close_names_only() {
        let names = ["device", "sidecar", "stack", "transport"];
        assert_eq!(did_you_mean("devic", &names), Some("device"));
        assert_eq!(did_you_mean("sidcar", &names), Some("sidecar"));
        assert_eq!(did_you_mean("volume", &names), None);
    }
}
