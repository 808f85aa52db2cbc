//! A problem with the configuration, located in its source so it can be shown like a
//! compiler error. Produced by parsing (`config`) and by validation (`model::validate`).

use crate::model::config::Origin;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Diagnostic {
    /// One sentence, starting with a capital letter, naming the offending value.
    pub message: String,
    /// Where the offending value was written.
    pub at: Origin,
    /// Other places that explain the problem (e.g. the first of two definitions).
    pub related: Vec<(Origin, String)>,
    /// How to fix it, when farm knows.
    pub hint: Option<String>,
}

impl Diagnostic {
    pub fn new(message: impl Into<String>, at: Origin) -> Self {
        Self {
            message: message.into(),
            at,
            related: Vec::new(),
            hint: None,
        }
    }

    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    pub fn related(mut self, at: Origin, note: impl Into<String>) -> Self {
        self.related.push((at, note.into()));
        self
    }
}

/// "a, b and c" — for hints that list what exists.
pub fn list_names<'a>(names: impl IntoIterator<Item = &'a String>) -> String {
    let names: Vec<String> = names.into_iter().map(|n| format!("`{n}`")).collect();
    match names.len() {
        0 => "none".to_string(),
        1 => names[0].clone(),
        n => format!("{} and {}", names[..n - 1].join(", "), names[n - 1]),
    }
}
