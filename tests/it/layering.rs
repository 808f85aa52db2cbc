//! The shape of `src/`: no import circle between files (a file that uses a name from
//! another, which uses one back, directly or through others), and no floor that uses one
//! above it (docs/ARCHITECTURE.md's floors). Read from the source: `use crate::…`,
//! `use super::…` and `crate::a::b::name` paths in code, comments and test modules left out.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The floors, lowest first: each folder may use its own and those below it.
const FLOORS: [&[&str]; 11] = [
    &["model"],
    &["sys"],
    &["progress"],
    &["config"],
    &["store", "fetch"],
    &["binary_cache"],
    &["project"],
    &["build"],
    &["run"],
    &["maintain", "testing", "fuzz", "image_export"],
    &["cli"],
];

type Module = Vec<String>;

fn module_of(src: &Path, file: &Path) -> Module {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Module = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if matches!(
        parts.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    ) {
        parts.pop();
    }
    parts
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs_err::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code of a file without comments, strings' contents and `#[cfg(test)] mod … { }`.
fn code_of(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if text[i..].starts_with("//") {
            i += text[i..].find('\n').unwrap_or(text.len() - i);
        } else if text[i..].starts_with("/*")
            && let Some(end) = text[i..].find("*/")
        {
            // (A `/*` with no end is a glob in a string.)
            i += end + 2;
        } else if text[i..].starts_with("#[cfg(test)]") {
            let rest = &text[i + "#[cfg(test)]".len()..];
            let trimmed = rest.trim_start();
            if trimmed.starts_with("mod ")
                && let Some(open) = trimmed.find('{')
            {
                if trimmed[..open].contains(';') {
                    out.push_str("#[cfg(test)]");
                    i += "#[cfg(test)]".len();
                    continue;
                }
                let start = i + "#[cfg(test)]".len() + (rest.len() - trimmed.len()) + open + 1;
                let mut depth = 1;
                let mut j = start;
                while j < bytes.len() && depth > 0 {
                    match bytes[j] {
                        b'{' => depth += 1,
                        b'}' => depth -= 1,
                        _ => {}
                    }
                    j += 1;
                }
                i = j;
            } else {
                out.push_str("#[cfg(test)]");
                i += "#[cfg(test)]".len();
            }
        } else {
            let ch = text[i..].chars().next().unwrap();
            out.push(ch);
            i += ch.len_utf8();
        }
    }
    out
}

/// `a::{b, c::{d, e as f}}` → `a::b`, `a::c::d`, `a::c::e` (an alias names nothing new).
fn expand(tree: &str) -> Vec<String> {
    let mut tree = tree.replace(char::is_whitespace, " ");
    while let Some(at) = tree.find(" as ") {
        let alias = &tree[at + 4..];
        let end = alias
            .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ' '))
            .unwrap_or(alias.len());
        tree.replace_range(at..at + 4 + end, "");
    }
    let tree: String = tree.chars().filter(|c| !c.is_whitespace()).collect();
    let Some(open) = tree.find('{') else {
        return vec![tree];
    };
    let (head, body) = (
        &tree[..open],
        &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())],
    );
    let mut parts = Vec::new();
    let (mut depth, mut current) = (0, String::new());
    for ch in body.chars() {
        match ch {
            ',' if depth == 0 => parts.push(std::mem::take(&mut current)),
            '{' => {
                depth += 1;
                current.push(ch)
            }
            '}' => {
                depth -= 1;
                current.push(ch)
            }
            _ => current.push(ch),
        }
    }
    parts.push(current);
    parts
        .iter()
        .filter(|p| !p.is_empty())
        .flat_map(|p| expand(&format!("{head}{p}")))
        .collect()
}

/// The paths a file's code names: its `use` trees and `crate::…`, `super::…` paths.
fn paths_in(code: &str) -> Vec<String> {
    let mut paths = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find("use ") {
        let before = rest[..at].chars().last();
        let tail = &rest[at + 4..];
        rest = tail;
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let Some(end) = tail.find(';') else { break };
        let tree = &tail[..end];
        if tree.starts_with("crate::") || tree.starts_with("super::") || tree.starts_with("self::")
        {
            paths.extend(expand(tree));
        }
    }
    for root in ["crate::", "super::"] {
        let mut rest = code;
        while let Some(at) = rest.find(root) {
            let starts_a_path = !rest[..at]
                .chars()
                .last()
                .is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':');
            let tail = &rest[at..];
            let end = tail
                .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                .unwrap_or(tail.len());
            if starts_a_path {
                paths.push(tail[..end].trim_end_matches(':').to_string());
            }
            rest = &tail[end.max(root.len())..];
        }
    }
    paths
}

/// The deepest file a path names, seen from `module`.
fn resolve(files: &BTreeMap<Module, PathBuf>, module: &Module, path: &str) -> Option<Module> {
    let mut segments: Vec<&str> = path.split("::").filter(|s| !s.is_empty()).collect();
    let base: Module = match segments.first() {
        Some(&"crate") => {
            segments.remove(0);
            Vec::new()
        }
        Some(&"super") | Some(&"self") => {
            let mut base = module.clone();
            while let Some(&first) = segments.first() {
                match first {
                    "super" => {
                        base.pop();
                    }
                    "self" => {}
                    _ => break,
                }
                segments.remove(0);
            }
            base
        }
        _ => return None,
    };
    let names: Vec<String> = segments.iter().map(|s| s.to_string()).collect();
    for take in (0..=names.len()).rev() {
        let mut candidate = base.clone();
        candidate.extend(names[..take].iter().cloned());
        if files.contains_key(&candidate) {
            return Some(candidate);
        }
    }
    None
}

/// Every file's imports of other files.
fn import_graph() -> BTreeMap<Module, BTreeSet<Module>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut paths = Vec::new();
    rust_files(&src, &mut paths);
    let files: BTreeMap<Module, PathBuf> = paths
        .into_iter()
        .map(|p| (module_of(&src, &p), p))
        .collect();
    files
        .iter()
        .map(|(module, file)| {
            let code = code_of(&fs_err::read_to_string(file).unwrap());
            let uses = paths_in(&code)
                .iter()
                .filter_map(|path| resolve(&files, module, path))
                .filter(|used| used != module && !used.is_empty())
                .collect();
            (module.clone(), uses)
        })
        .collect()
}

/// Strongly connected groups of more than one file (Tarjan).
fn circles(graph: &BTreeMap<Module, BTreeSet<Module>>) -> Vec<Vec<Module>> {
    struct Walk<'a> {
        graph: &'a BTreeMap<Module, BTreeSet<Module>>,
        index: BTreeMap<&'a Module, usize>,
        low: BTreeMap<&'a Module, usize>,
        stack: Vec<&'a Module>,
        on_stack: BTreeSet<&'a Module>,
        found: Vec<Vec<Module>>,
    }
    impl<'a> Walk<'a> {
        fn visit(&mut self, node: &'a Module) {
            let n = self.index.len();
            self.index.insert(node, n);
            self.low.insert(node, n);
            self.stack.push(node);
            self.on_stack.insert(node);
            for next in self.graph.get(node).into_iter().flatten() {
                let Some((next, _)) = self.graph.get_key_value(next) else {
                    continue;
                };
                if !self.index.contains_key(next) {
                    self.visit(next);
                    let low = self.low[node].min(self.low[next]);
                    self.low.insert(node, low);
                } else if self.on_stack.contains(next) {
                    let low = self.low[node].min(self.index[next]);
                    self.low.insert(node, low);
                }
            }
            if self.low[node] == self.index[node] {
                let mut group = Vec::new();
                while let Some(top) = self.stack.pop() {
                    self.on_stack.remove(top);
                    group.push(top.clone());
                    if top == node {
                        break;
                    }
                }
                if group.len() > 1 {
                    self.found.push(group);
                }
            }
        }
    }
    let mut walk = Walk {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        found: Vec::new(),
    };
    for node in graph.keys() {
        if !walk.index.contains_key(node) {
            walk.visit(node);
        }
    }
    walk.found
}

fn file_name(module: &Module) -> String {
    format!("src/{}", module.join("/"))
}

#[test]
fn no_two_files_of_src_import_each_other_directly_or_through_others() {
    let graph = import_graph();
    assert!(graph.len() > 100, "the source was not found: {graph:?}");
    let found: Vec<String> = circles(&graph)
        .iter()
        .map(|group| {
            let mut names: Vec<String> = group.iter().map(file_name).collect();
            names.sort();
            names.join(" ↔ ")
        })
        .collect();
    assert!(
        found.is_empty(),
        "import circles (untie them: move what both sides share into a leaf module):\n{}",
        found.join("\n")
    );
}

/// The floors inside `model/`, lowest first: the leaves at its root, then its folders.
const MODEL_FLOORS: [&[&str]; 4] = [
    &["hash", "programs", "shell", "signing", "text", "values"],
    &["config"],
    &["build"],
    &["lab"],
];

/// Every import, as "FILE uses FILE", from a module to one on a higher floor; `floor_of`
/// places a module, or says it is not on any of these floors.
fn upward_imports(floor_of: impl Fn(&Module) -> Option<usize>) -> Vec<String> {
    let mut upward = Vec::new();
    for (module, uses) in import_graph() {
        let Some(floor) = floor_of(&module) else {
            continue;
        };
        for used in uses {
            if floor_of(&used).is_some_and(|above| above > floor) {
                upward.push(format!("{} uses {}", file_name(&module), file_name(&used)));
            }
        }
    }
    upward
}

#[test]
fn no_floor_imports_from_a_floor_above_it() {
    let upward = upward_imports(|module| {
        let top = module.first().map(String::as_str).unwrap_or("");
        FLOORS.iter().position(|floor| floor.contains(&top))
    });
    assert!(
        upward.is_empty(),
        "imports from a floor above:\n{}",
        upward.join("\n")
    );
}

#[test]
fn no_floor_of_the_model_imports_from_one_above_it() {
    let upward = upward_imports(|module| match module.as_slice() {
        [model, part, ..] if model == "model" => MODEL_FLOORS
            .iter()
            .position(|floor| floor.contains(&part.as_str())),
        _ => None,
    });
    assert!(
        upward.is_empty(),
        "model imports from a floor above:\n{}",
        upward.join("\n")
    );
    let unplaced: Vec<String> = import_graph()
        .into_keys()
        .filter(|m| m.len() >= 2 && m[0] == "model")
        .filter(|m| !MODEL_FLOORS.iter().any(|f| f.contains(&m[1].as_str())))
        .map(|m| file_name(&m))
        .collect();
    assert!(
        unplaced.is_empty(),
        "model files on no floor (add them to MODEL_FLOORS or a floor's folder): {unplaced:?}"
    );
}

#[test]
fn the_reader_finds_circles_and_expands_use_trees() {
    assert_eq!(
        expand("crate::a::{b, c::{d, e as f}}"),
        ["crate::a::b", "crate::a::c::d", "crate::a::c::e"]
    );
    let code = code_of(
        "use crate::x::Y; // use crate::no;\n#[cfg(test)]\nmod tests { use crate::z; }\nfn f() { crate::w::g(); }",
    );
    let found: BTreeSet<String> = paths_in(&code).into_iter().collect();
    assert_eq!(
        found,
        BTreeSet::from(["crate::x::Y".into(), "crate::w::g".into()])
    );
    let module = |name: &str| vec![name.to_string()];
    let graph = BTreeMap::from([
        (module("a"), BTreeSet::from([module("b")])),
        (module("b"), BTreeSet::from([module("c")])),
        (module("c"), BTreeSet::from([module("a")])),
        (module("d"), BTreeSet::from([module("a")])),
    ]);
    let found = circles(&graph);
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].len(), 3);
}
