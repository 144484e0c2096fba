//! Diagnostics for stack.kdl: one located problem each, rendered with the source line and a
//! caret under the span (miette), and collected so `validate` reports every error in one run.

use std::fmt;
use std::sync::Arc;

use miette::SourceSpan;

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

/// How many problems are rendered; the rest are counted ("and N more").
pub const MAX_RENDERED: usize = 50;

/// The widest source excerpt rendered, in characters: longer lines are cut around the span.
pub const MAX_EXCERPT: usize = 100;

/// The longest message, label or hint rendered, in characters (they may quote the file).
pub const MAX_MESSAGE: usize = 200;

impl Diagnostics {
    /// `line:column` (1-based, columns in characters) of a byte offset.
    pub fn line_col(&self, offset: usize) -> (usize, usize) {
        line_col(&self.source, offset)
    }

    /// Renders the first [`MAX_RENDERED`] problems as `path:line:column`, the source line (cut
    /// to [`MAX_EXCERPT`] characters around the span) and a caret under the span, then the
    /// count. `color` adds ANSI colours for terminals. Linear in the source's length.
    pub fn render(&self, color: bool) -> String {
        let paint = |code: &str, text: &str| {
            if color {
                format!("\x1b[{code}m{text}\x1b[0m")
            } else {
                text.to_string()
            }
        };
        let mut out = String::new();
        let mut lines = LineIndex::new(&self.source);
        for problem in self.problems.iter().take(MAX_RENDERED) {
            let (line, col, text) = lines.locate(problem.span.offset);
            let (excerpt, caret_at) = excerpt(text, col - 1);
            let span_chars = self
                .source
                .get(problem.span.offset..)
                .unwrap_or("")
                .chars()
                .take(problem.span.len.max(1))
                .take_while(|c| *c != '\n')
                .count();
            let width =
                span_chars.clamp(1, excerpt.chars().count().saturating_sub(caret_at).max(1));
            let gutter = " ".repeat(line.to_string().len());
            let bar = paint("34", "|");
            out.push_str(&format!(
                "{}: {}\n{gutter}{} {}:{line}:{col}\n{gutter} {bar}\n{} {bar} {excerpt}\n{gutter} {bar} {}{}",
                paint("1;31", "error"),
                clip(&problem.message),
                paint("34", "-->"),
                self.path,
                paint("34", &line.to_string()),
                " ".repeat(caret_at),
                paint("1;31", &"^".repeat(width)),
            ));
            if let Some(label) = &problem.label {
                out.push(' ');
                out.push_str(&paint("1;31", &clip(label)));
            }
            out.push('\n');
            if let Some(help) = &problem.help {
                out.push_str(&format!(
                    "{gutter} = {}: {}\n",
                    paint("1", "help"),
                    clip(help)
                ));
            }
            out.push('\n');
        }
        let n = self.problems.len();
        if n > MAX_RENDERED {
            out.push_str(&format!("… and {} more\n", n - MAX_RENDERED));
        }
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
    let (line, col, _) = LineIndex::new(source).locate(offset);
    (line, col)
}

/// Locates offsets in a source, walking forward from the last one located, so locating
/// problems sorted by offset costs one pass over the source in all.
struct LineIndex<'a> {
    source: &'a str,
    /// The start of the line `line` (1-based).
    line_start: usize,
    line: usize,
}

impl<'a> LineIndex<'a> {
    fn new(source: &'a str) -> Self {
        LineIndex {
            source,
            line_start: 0,
            line: 1,
        }
    }

    /// `(line, column, the line's text)` of a byte offset; columns count characters.
    fn locate(&mut self, offset: usize) -> (usize, usize, &'a str) {
        let src = self.source;
        let mut offset = offset.min(src.len());
        while !src.is_char_boundary(offset) {
            offset -= 1;
        }
        if offset < self.line_start {
            *self = LineIndex::new(src);
        }
        let before = &src[self.line_start..offset];
        if let Some(last) = before.rfind('\n') {
            self.line += before.bytes().filter(|&b| b == b'\n').count();
            self.line_start += last + 1;
        }
        let col = src[self.line_start..offset].chars().count() + 1;
        let end = src[self.line_start..]
            .find('\n')
            .map_or(src.len(), |i| self.line_start + i);
        (self.line, col, &src[self.line_start..end])
    }
}

/// One line of at most [`MAX_MESSAGE`] characters, `…` where cut.
fn clip(text: &str) -> String {
    let mut out: String = text
        .chars()
        .take(MAX_MESSAGE)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if text.chars().nth(MAX_MESSAGE).is_some() {
        out.push('…');
    }
    out
}

/// The line as shown: tabs and control characters as one space each (so the caret lines up),
/// cut to [`MAX_EXCERPT`] characters around `col` (0-based) with `…` where cut. Returns the
/// text and the caret's column in it.
fn excerpt(line: &str, col: usize) -> (String, usize) {
    let chars: Vec<char> = line
        .trim_end_matches('\r')
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if chars.len() <= MAX_EXCERPT {
        let caret = col.min(chars.len());
        return (chars.into_iter().collect(), caret);
    }
    let start = col
        .saturating_sub(MAX_EXCERPT / 3)
        .min(chars.len() - MAX_EXCERPT);
    let end = start + MAX_EXCERPT;
    let mut text = String::new();
    let mut caret = col - start;
    if start > 0 {
        text.push('…');
        caret += 1;
    }
    text.extend(&chars[start..end]);
    if end < chars.len() {
        text.push('…');
    }
    (text, caret)
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
