//! Rendering diagnostics against their sources, the way cargo and rustc show errors.

use std::fmt::Write;
use std::path::PathBuf;

use crate::model::config::Origin;
use crate::model::config::diagnostic::Diagnostic;

#[derive(Clone, Debug)]
pub struct SourceFile {
    pub path: PathBuf,
    pub text: String,
}

/// The configuration's files, indexed by `FileId`.
#[derive(Clone, Debug, Default)]
pub struct SourceMap {
    pub files: Vec<SourceFile>,
}

impl SourceMap {
    pub fn new(files: Vec<SourceFile>) -> Self {
        Self { files }
    }

    /// 1-based line and column of `origin`'s start.
    pub fn line_col(&self, origin: &Origin) -> (usize, usize) {
        let Some(file) = self.files.get(origin.file) else {
            return (1, 1);
        };
        let offset = origin.span.start.min(file.text.len());
        let before = &file.text[..offset];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let col = before[line_start..].chars().count() + 1;
        (line, col)
    }

    /// `path:line:col`, the form editors and terminals turn into links.
    pub fn location(&self, origin: &Origin) -> String {
        let (line, col) = self.line_col(origin);
        let path = self
            .files
            .get(origin.file)
            .map(|f| f.path.display().to_string())
            .unwrap_or_else(|| "<unknown>".to_string());
        format!("{path}:{line}:{col}")
    }

    pub fn render(&self, diagnostic: &Diagnostic) -> String {
        let mut out = format!("error: {}\n", diagnostic.message);
        self.snippet(&mut out, &diagnostic.at);
        for (origin, note) in &diagnostic.related {
            let _ = writeln!(out, "note: {note}");
            self.snippet(&mut out, origin);
        }
        if let Some(hint) = &diagnostic.hint {
            let _ = writeln!(out, "hint: {hint}");
        }
        out
    }

    pub fn render_all(&self, diagnostics: &[Diagnostic]) -> String {
        let mut out: Vec<String> = diagnostics.iter().map(|d| self.render(d)).collect();
        if diagnostics.len() > 1 {
            out.push(format!("{} problems found", diagnostics.len()));
        }
        out.join("\n").trim_end().to_string()
    }

    fn snippet(&self, out: &mut String, origin: &Origin) {
        let (line, col) = self.line_col(origin);
        let _ = writeln!(out, "  --> {}", self.location(origin));
        let Some(file) = self.files.get(origin.file) else {
            return;
        };
        if origin.span.is_empty() && origin.span.start == 0 {
            return; // a whole-file origin (e.g. platforms/NAME.toml): no line to show
        }
        let text = file.text.lines().nth(line - 1).unwrap_or("");
        let gutter = line.to_string().len();
        let span_text = file
            .text
            .get(origin.span.clone())
            .unwrap_or("")
            .lines()
            .next()
            .unwrap_or("");
        let width = span_text.chars().count().max(1);
        let _ = writeln!(out, "{:gutter$} |", "");
        let _ = writeln!(out, "{line} | {text}");
        let _ = writeln!(
            out,
            "{:gutter$} | {}{}",
            "",
            " ".repeat(col - 1),
            "^".repeat(width)
        );
    }
}
