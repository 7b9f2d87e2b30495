//! `cargo xtask lint` keeps the agent's house in order: each top-level module of `agent/src`
//! imports only modules of lower layers (so there is no import circle and nothing reaches up),
//! no function outside the tests is longer than [`MAX_FUNCTION_LINES`], and no file holds more
//! than [`MAX_FILE_LINES`] before its tests. It reads the code as text: every `crate::name`
//! path outside a file's tests is an import of the module `name`.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

use anyhow::{bail, Context as _};

/// The agent's layers, bottom first: a module may import only modules of layers below its own.
/// The data flows upward through them: the compiled table and the metrics' plumbing at the
/// bottom, then policy, its publisher, the sources and consumers of snapshots, the proxy, and
/// the wiring.
pub const LAYERS: &[&[&str]] = &[
    &["table", "metrics", "cgroup", "supervise"],
    &["policy", "ebpf"],
    &["state"],
    &["identity", "capture", "kubernetes"],
    &["proxy"],
    &["handoff", "config", "admin", "ofrep"],
    &["run"],
];

pub const MAX_FUNCTION_LINES: usize = 150;
pub const MAX_FILE_LINES: usize = 1200;

/// Checks `agent/src` below `root`; the error lists every finding.
pub fn check(root: &Path) -> anyhow::Result<()> {
    let src = root.join("agent/src");
    let mut files = Vec::new();
    collect(&src, &mut files)?;
    let mut findings = Vec::new();
    let mut imports: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for path in &files {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let relative = path.strip_prefix(&src).unwrap_or(path);
        let name = relative.display().to_string();
        let code = before_tests(&text);
        if code.lines().count() > MAX_FILE_LINES {
            findings.push(format!(
                "{name}: {} lines before its tests (at most {MAX_FILE_LINES})",
                code.lines().count()
            ));
        }
        for (function, line, length) in long_functions(code) {
            findings.push(format!(
                "{name}:{line}: fn {function} is {length} lines (at most {MAX_FUNCTION_LINES})"
            ));
        }
        if let Some(module) = top_module(relative) {
            let imported = imports.entry(module.clone()).or_default();
            imported.extend(crate_paths(code).into_iter().filter(|m| *m != module));
        }
    }
    findings.extend(layer_findings(&imports));
    if findings.is_empty() {
        return Ok(());
    }
    bail!("the house of agent/src:\n  {}", findings.join("\n  "))
}

fn collect(dir: &Path, files: &mut Vec<std::path::PathBuf>) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            collect(&path, files)?;
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    files.sort();
    Ok(())
}

/// The module a file of `agent/src` belongs to: `proxy` for `proxy/http/mod.rs`, `state` for
/// `state.rs`; none for the crate's roots.
fn top_module(relative: &Path) -> Option<String> {
    let first = relative.components().next()?.as_os_str().to_str()?;
    let module = first.strip_suffix(".rs").unwrap_or(first);
    (!matches!(module, "lib" | "main")).then(|| module.to_owned())
}

/// A file's text up to its test module (`#[cfg(test)]` at the start of a line).
fn before_tests(text: &str) -> &str {
    let cut = text
        .match_indices("#[cfg(test)]")
        .find(|(at, _)| *at == 0 || text.as_bytes()[at - 1] == b'\n')
        .map_or(text.len(), |(at, _)| at);
    &text[..cut]
}

/// Each finding of an import that does not go down: a module unknown to [`LAYERS`], or an
/// import of a module of its own layer or above.
fn layer_findings(imports: &BTreeMap<String, BTreeSet<String>>) -> Vec<String> {
    let layer_of = |module: &str| LAYERS.iter().position(|layer| layer.contains(&module));
    let mut findings = Vec::new();
    for (module, imported) in imports {
        let Some(own) = layer_of(module) else {
            findings.push(format!("module {module} has no layer: add it to LAYERS"));
            continue;
        };
        for target in imported {
            match layer_of(target) {
                Some(layer) if layer < own => {}
                Some(_) => findings.push(format!(
                    "{module} imports {target}, which is not in a layer below it"
                )),
                None => findings.push(format!(
                    "{module} imports {target}, which has no layer: add it to LAYERS"
                )),
            }
        }
    }
    findings
}

/// The top-level modules a piece of code names through `crate::`, in paths and in
/// `use crate::{a::x, b}` groups.
fn crate_paths(code: &str) -> BTreeSet<String> {
    let code = blank_comments_and_literals(code);
    let mut modules = BTreeSet::new();
    for (at, _) in code.match_indices("crate::") {
        let preceded_by_ident = code[..at]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_alphanumeric() || c == '_');
        if preceded_by_ident {
            continue;
        }
        let rest = &code[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            modules.extend(group_heads(group));
        } else {
            modules.extend(ident(rest));
        }
    }
    modules
}

/// The first name of each item of a `{...}` group (the text after its opening brace).
fn group_heads(group: &str) -> Vec<String> {
    let mut heads = Vec::new();
    let mut depth = 0;
    let mut expecting = true;
    for (i, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => break,
            '}' => depth -= 1,
            ',' if depth == 0 => expecting = true,
            c if expecting && depth == 0 && (c.is_alphabetic() || c == '_') => {
                heads.extend(ident(&group[i..]));
                expecting = false;
            }
            _ => {}
        }
    }
    heads.retain(|h| h != "self");
    heads
}

fn ident(text: &str) -> Option<String> {
    let end = text
        .find(|c: char| !(c.is_alphanumeric() || c == '_'))
        .unwrap_or(text.len());
    (end > 0).then(|| text[..end].to_owned())
}

/// The code with comments and the insides of string and char literals as spaces (newlines
/// kept), so that braces and names are only the code's own.
fn blank_comments_and_literals(code: &str) -> String {
    let chars: Vec<char> = code.chars().collect();
    let mut out = String::with_capacity(code.len());
    let blank = |c: char| if c == '\n' { '\n' } else { ' ' };
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                out.push(' ');
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                    depth += 1;
                    out.push_str("  ");
                    i += 2;
                } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    out.push_str("  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    out.push(blank(chars[i]));
                    i += 1;
                }
            }
        } else if c == 'r' && matches!(next, Some('"') | Some('#')) && !ident_before(&chars, i) {
            let hashes = chars[i + 1..].iter().take_while(|&&h| h == '#').count();
            if chars.get(i + 1 + hashes) != Some(&'"') {
                out.push(c);
                i += 1;
                continue;
            }
            let close: Vec<char> = std::iter::once('"')
                .chain(std::iter::repeat_n('#', hashes))
                .collect();
            out.push('"');
            i += 2 + hashes;
            while i < chars.len() && !chars[i..].starts_with(&close) {
                out.push(blank(chars[i]));
                i += 1;
            }
            out.push('"');
            i += close.len();
        } else if c == '"' {
            out.push('"');
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                let skip = if chars[i] == '\\' { 2 } else { 1 };
                for k in 0..skip {
                    if let Some(&s) = chars.get(i + k) {
                        out.push(blank(s));
                    }
                }
                i += skip;
            }
            out.push('"');
            i += 1;
        } else if c == '\'' && is_char_literal(&chars, i) {
            let len = if next == Some('\\') {
                chars[i + 1..]
                    .iter()
                    .position(|&q| q == '\'')
                    .map_or(1, |p| p + 2)
            } else {
                3
            };
            out.push_str(&" ".repeat(len));
            i += len;
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

fn ident_before(chars: &[char], i: usize) -> bool {
    i > 0 && (chars[i - 1].is_alphanumeric() || chars[i - 1] == '_')
}

/// `'x'` or `'\n'`, not a lifetime `'a`.
fn is_char_literal(chars: &[char], i: usize) -> bool {
    match chars.get(i + 1) {
        Some('\\') => true,
        Some(_) => chars.get(i + 2) == Some(&'\''),
        None => false,
    }
}

/// The functions of `code` longer than [`MAX_FUNCTION_LINES`], from the line of `fn` to the
/// line of the closing brace: (name, first line, length).
fn long_functions(code: &str) -> Vec<(String, usize, usize)> {
    let code = blank_comments_and_literals(code);
    let mut found = Vec::new();
    // Open functions: (name, first line, the depth their body opens at, whether it has).
    let mut open: Vec<(String, usize, usize, bool)> = Vec::new();
    let mut depth = 0;
    let mut line = 1;
    let bytes = code.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\n' => line += 1,
            b'{' => {
                if let Some(f) = open.last_mut().filter(|f| !f.3) {
                    f.2 = depth;
                    f.3 = true;
                }
                depth += 1;
            }
            b'}' => {
                depth -= 1;
                if open.last().is_some_and(|f| f.3 && f.2 == depth) {
                    let (name, first, _, _) = open.pop().expect("an open function");
                    let length = line - first + 1;
                    if length > MAX_FUNCTION_LINES {
                        found.push((name, first, length));
                    }
                }
            }
            // A declaration without a body, as in a trait.
            b';' if open.last().is_some_and(|f| !f.3) => {
                open.pop();
            }
            b'f' if code[i..].starts_with("fn ") && !ident_before_byte(bytes, i) => {
                if let Some(name) = ident(code[i + 3..].trim_start()) {
                    open.push((name, line, 0, false));
                }
            }
            _ => {}
        }
        i += 1;
    }
    found
}

fn ident_before_byte(bytes: &[u8], i: usize) -> bool {
    i > 0 && (bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crate_paths_are_read_from_paths_and_groups_not_from_comments_or_strings() {
        let code = r#"
use crate::{
    policy::{compiler, Store},
    table::{self, RouteTable},
    state,
};
use crate::metrics::Family;
// crate::run is only mentioned
let s = "crate::admin";
fn f() -> crate::proxy::X { todo!() }
"#;
        let modules: Vec<String> = crate_paths(code).into_iter().collect();
        assert_eq!(modules, ["metrics", "policy", "proxy", "state", "table"]);
    }

    #[test]
    fn an_import_must_go_down_a_layer() {
        let imports = BTreeMap::from([
            ("policy".to_owned(), BTreeSet::from(["table".to_owned()])),
            ("table".to_owned(), BTreeSet::from(["policy".to_owned()])),
            ("state".to_owned(), BTreeSet::from(["newcomer".to_owned()])),
            ("newcomer".to_owned(), BTreeSet::new()),
        ]);
        assert_eq!(
            layer_findings(&imports),
            [
                "module newcomer has no layer: add it to LAYERS",
                "state imports newcomer, which has no layer: add it to LAYERS",
                "table imports policy, which is not in a layer below it",
            ]
        );
    }

    #[test]
    fn long_functions_are_counted_from_fn_to_their_closing_brace() {
        let body = "    let x = '{';\n    // }\n    let s = \"}}\";\n".repeat(50);
        let code = format!(
            "trait T {{\n    fn declared(&self);\n}}\n\
             pub(crate) async fn long() {{\n{body}    if true {{ }}\n}}\n\
             fn short() {{ let f = |x: &'static str| x; }}\n"
        );
        assert_eq!(long_functions(&code), [("long".to_owned(), 4, 153)]);
    }

    #[test]
    fn the_tests_of_a_file_are_left_out() {
        let text = "fn a() {}\n#[cfg(test)]\nmod tests {}\n";
        assert_eq!(before_tests(text), "fn a() {}\n");
        assert_eq!(
            top_module(Path::new("proxy/http/mod.rs")).as_deref(),
            Some("proxy")
        );
        assert_eq!(top_module(Path::new("state.rs")).as_deref(), Some("state"));
        assert_eq!(top_module(Path::new("lib.rs")), None);
    }

    #[test]
    fn the_agent_keeps_its_house() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        check(&root).unwrap();
    }
}
