//! `include/stasis.h` and the library's `extern "C"` functions (`src/ffi.rs`) must not drift
//! apart: every function (name, parameter and return types), constant (value) and field of
//! `struct stasis_event` on one side must be on the other.
#![allow(missing_docs)]

use std::collections::BTreeMap;
use std::path::Path;

fn read(rel: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Splits `s` at top-level commas (not inside (), <> or []).
fn split_top(s: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let mut depth = 0i32;
    let mut cur = String::new();
    for c in s.chars() {
        match c {
            '(' | '<' | '[' => depth += 1,
            ')' | '>' | ']' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(cur.trim().to_owned());
                cur.clear();
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    if !cur.trim().is_empty() {
        parts.push(cur.trim().to_owned());
    }
    parts
}

/// The text between the `(` at `open` and its matching `)`.
fn balanced(s: &str, open: usize) -> &str {
    let mut depth = 0;
    for (i, c) in s[open..].char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    return &s[open + 1..open + i];
                }
            }
            _ => {}
        }
    }
    panic!("unbalanced parentheses after {}", &s[open..]);
}

/// A C parameter's type, in Rust terms.
fn c_type(param: &str) -> String {
    let p = param.split_whitespace().collect::<Vec<_>>().join(" ");
    if p.contains("(*") {
        // void (*cb)(const struct stasis_event *event, void *arg)
        assert!(
            p.starts_with("void (*")
                && p.contains("(const struct stasis_event *")
                && p.ends_with("void *arg)"),
            "unexpected function pointer {p}"
        );
        return "Option<CFunc>".into();
    }
    if p == "void" {
        return String::new();
    }
    if p.starts_with("void *") {
        return "*mut c_void".into();
    }
    if p.starts_with("unsigned int ") {
        return "u32".into();
    }
    if p.starts_with("int ") || p == "int" {
        return "i32".into();
    }
    panic!("unknown C type in {p:?}");
}

fn header_functions(h: &str) -> BTreeMap<String, Vec<String>> {
    let mut out = BTreeMap::new();
    let mut rest = h;
    while let Some(at) = rest.find("int stasis_") {
        let decl = &rest[at + 4..];
        let open = decl.find('(').expect("(");
        let name = decl[..open].trim().to_owned();
        let params = balanced(decl, open);
        let types = split_top(params)
            .iter()
            .map(|p| c_type(p))
            .filter(|t| !t.is_empty())
            .collect();
        out.insert(name, types);
        rest = &decl[open..];
    }
    out
}

fn rust_functions(src: &str) -> BTreeMap<String, Vec<String>> {
    let mut out = BTreeMap::new();
    let mut rest = src;
    while let Some(at) = rest.find("pub extern \"C\" fn ") {
        let decl = &rest[at + "pub extern \"C\" fn ".len()..];
        let open = decl.find('(').expect("(");
        let name = decl[..open].trim().to_owned();
        let params = balanced(decl, open);
        let after = &decl[open + params.len() + 2..];
        assert!(
            after.trim_start().starts_with("-> i32"),
            "{name} must return i32 (C int)"
        );
        let types = split_top(params)
            .iter()
            .map(|p| {
                p.split_once(':')
                    .map(|(_, t)| t.trim().to_owned())
                    .unwrap_or_else(|| panic!("parameter {p:?} of {name}"))
            })
            .collect();
        out.insert(name, types);
        rest = after;
    }
    out
}

fn header_constants(h: &str) -> BTreeMap<String, i64> {
    h.lines()
        .filter_map(|l| l.strip_prefix("#define STASIS_"))
        .filter(|l| !l.starts_with("H"))
        .map(|l| {
            let mut it = l.split_whitespace();
            let name = format!("STASIS_{}", it.next().expect("name"));
            let value = it.next().expect("value").trim_matches(['(', ')']);
            (name, value.parse().expect("integer value"))
        })
        .collect()
}

fn rust_constants(src: &str) -> BTreeMap<String, i64> {
    src.lines()
        .filter_map(|l| l.trim().strip_prefix("pub const "))
        .map(|l| {
            let (name, rest) = l.split_once(':').expect("const name");
            let value = rest.split_once('=').expect("const value").1;
            (
                name.trim().to_owned(),
                value.trim().trim_end_matches(';').parse().expect("integer"),
            )
        })
        .collect()
}

fn header_fields(h: &str) -> Vec<(String, String)> {
    let start = h
        .find("struct stasis_event {")
        .expect("struct stasis_event");
    let body = &h[start..h[start..].find("};").expect("end of struct") + start];
    body.lines()
        .skip(1)
        .filter_map(|l| l.split(';').next().filter(|d| !d.trim().is_empty()))
        .map(|d| {
            let d = d.trim();
            let name = d.rsplit(' ').next().expect("field").to_owned();
            (name, c_type(d))
        })
        .collect()
}

fn rust_fields(src: &str) -> Vec<(String, String)> {
    let start = src.find("pub struct StasisEvent {").expect("StasisEvent");
    let body = &src[start..src[start..].find('}').expect("end") + start];
    body.lines()
        .filter_map(|l| l.trim().strip_prefix("pub "))
        .filter(|l| l.contains(':') && !l.starts_with("struct"))
        .map(|l| {
            let (n, t) = l.split_once(':').expect("field");
            (
                n.trim().to_owned(),
                t.trim().trim_end_matches(',').to_owned(),
            )
        })
        .collect()
}

#[test]
fn header_matches_the_rust_abi() {
    let h = read("../../include/stasis.h");
    let src = read("src/ffi.rs");
    let (hf, rf) = (header_functions(&h), rust_functions(&src));
    assert_eq!(hf.len(), 5, "functions in the header: {hf:?}");
    assert_eq!(hf, rf, "functions: header (left) vs src/ffi.rs (right)");
    let (hc, rc) = (header_constants(&h), rust_constants(&src));
    assert_eq!(hc.len(), 9, "constants in the header: {hc:?}");
    assert_eq!(hc, rc, "constants: header (left) vs src/ffi.rs (right)");
    assert_eq!(
        header_fields(&h),
        rust_fields(&src),
        "struct stasis_event: header (left) vs StasisEvent (right)"
    );
}

#[test]
fn the_checker_sees_a_drift() {
    let h = read("../../include/stasis.h");
    let drifted = h.replace(
        "int stasis_request_checkpoint(int blocking);",
        "int stasis_request_checkpoint(int blocking, int kill);",
    );
    assert_ne!(
        header_functions(&drifted),
        rust_functions(&read("src/ffi.rs"))
    );
    let drifted = h.replace(
        "#define STASIS_POST_RESTART 2",
        "#define STASIS_POST_RESTART 3",
    );
    assert_ne!(
        header_constants(&drifted),
        rust_constants(&read("src/ffi.rs"))
    );
}
