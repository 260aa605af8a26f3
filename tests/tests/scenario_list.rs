//! The scenario list (docs/scenarios.md) holds in a fresh clone: every failure or attack
//! scenario id the repository cites has an entry there, and every test an entry names
//! exists in the file it names. No cluster needed: it reads files.
//!
//! An id is a capital `G`, `K`, `M`, `N`, `S`, `T` or `V` and one to three digits, as a
//! word of its own (`M3`, `V20`; not `K8s` nor `G9_SEED`); a range (`M1-M14`, `V16–V19`)
//! cites every id in it. Rust code is not read, only its comments and string literals,
//! so `IpAddr::V4` is no citation.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

const LIST: &str = "docs/scenarios.md";
const PREFIXES: &[char] = &['G', 'K', 'M', 'N', 'S', 'T', 'V'];
/// The kinds of file that cite ids: code, documents, scripts and manifests.
const EXTENSIONS: &[&str] = &["rs", "md", "sh", "yaml", "yml", "toml", "tpl", "py", "go"];
/// Build output, caches and fuzz inputs: not written by hand, so they cite nothing.
const SKIPPED_DIRS: &[&str] = &["target", ".git", ".cache", "corpus", "artifacts", "node_modules"];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the workspace")
        .to_path_buf()
}

/// One entry of the list: its id and the `file::function` tests its "Tests:" paragraph
/// names, or none with "not covered yet".
struct Entry {
    tests: Vec<(String, String)>,
    uncovered: bool,
}

fn read_list(text: &str) -> Result<BTreeMap<String, Entry>, Vec<String>> {
    let mut entries = BTreeMap::new();
    let mut errors = Vec::new();
    let mut current: Option<(String, Option<String>)> = None;
    let mut in_tests = false;
    for line in text.lines() {
        if let Some(heading) = line.strip_prefix("### ") {
            finish(current.take(), &mut entries, &mut errors);
            in_tests = false;
            let id = heading.split(':').next().unwrap_or_default().trim();
            match ids_in(id).as_slice() {
                [(only, _)] if only == id => current = Some((id.to_string(), None)),
                _ => errors.push(format!("heading {heading:?} does not start with one id")),
            }
        } else if line.starts_with("## ") {
            finish(current.take(), &mut entries, &mut errors);
            in_tests = false;
        } else if let Some((_, tests)) = current.as_mut() {
            if let Some(rest) = line.strip_prefix("Tests:") {
                *tests = Some(rest.to_string());
                in_tests = true;
            } else if line.trim().is_empty() {
                in_tests = false;
            } else if in_tests && let Some(tests) = tests.as_mut() {
                tests.push(' ');
                tests.push_str(line);
            }
        }
    }
    finish(current.take(), &mut entries, &mut errors);
    if errors.is_empty() {
        Ok(entries)
    } else {
        Err(errors)
    }
}

/// Closes the entry being read: its "Tests:" paragraph read into named tests.
fn finish(
    current: Option<(String, Option<String>)>,
    entries: &mut BTreeMap<String, Entry>,
    errors: &mut Vec<String>,
) {
    let Some((id, tests)) = current else { return };
    let Some(tests) = tests else {
        errors.push(format!("{id}: no \"Tests:\" paragraph"));
        return;
    };
    let named = backticked(&tests)
        .filter_map(|item| item.split_once("::").map(|(f, n)| (f.to_string(), n.to_string())))
        .collect::<Vec<_>>();
    let uncovered = tests.contains("not covered yet");
    if named.is_empty() && !uncovered {
        errors.push(format!(
            "{id}: names no test and does not say \"not covered yet\""
        ));
    }
    if entries
        .insert(
            id.clone(),
            Entry {
                tests: named,
                uncovered,
            },
        )
        .is_some()
    {
        errors.push(format!("{id}: listed twice"));
    }
}

fn backticked(text: &str) -> impl Iterator<Item = &str> {
    text.split('`').skip(1).step_by(2)
}

/// Every id cited in `text`, ranges expanded, each with the character offset it starts at.
fn ids_in(text: &str) -> Vec<(String, usize)> {
    let chars: Vec<char> = text.chars().collect();
    let word = |i: usize| chars.get(i).is_some_and(|c| c.is_alphanumeric() || *c == '_');
    // The digits of an id starting at `i` (letter included when `letter`), and where
    // they end, if they stand as a word's end.
    let number = |mut i: usize| -> Option<(u32, usize)> {
        let start = i;
        while i < chars.len() && chars[i].is_ascii_digit() && i - start < 4 {
            i += 1;
        }
        let digits = i - start;
        if digits == 0 || digits > 3 || word(i) {
            return None;
        }
        let n = chars[start..i].iter().collect::<String>().parse().ok()?;
        Some((n, i))
    };
    let mut found = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let letter = chars[i];
        if !PREFIXES.contains(&letter) || (i > 0 && word(i - 1)) {
            i += 1;
            continue;
        }
        let Some((first, mut end)) = number(i + 1) else {
            i += 1;
            continue;
        };
        let mut last = first;
        // A range: `-` or an en dash, the same letter optional, then the last number.
        let mut j = end;
        while chars.get(j) == Some(&' ') {
            j += 1;
        }
        if matches!(chars.get(j), Some('-' | '–')) {
            j += 1;
            while chars.get(j) == Some(&' ') {
                j += 1;
            }
            if chars.get(j) == Some(&letter) {
                j += 1;
            }
            if let Some((to, to_end)) = number(j)
                && to > first
                && to - first < 50
            {
                last = to;
                end = to_end;
            }
        }
        for n in first..=last {
            found.push((format!("{letter}{n}"), i));
        }
        i = end;
    }
    found
}

/// The comments and string literals of Rust source, each kept on its own line so that
/// line numbers stay right; code becomes spaces.
fn rust_prose(source: &str) -> String {
    #[derive(PartialEq)]
    enum State {
        Code,
        LineComment,
        BlockComment(u32),
        Str,
        RawStr(usize),
    }
    let chars: Vec<char> = source.chars().collect();
    let mut out = String::with_capacity(source.len());
    let mut state = State::Code;
    let mut i = 0;
    let at = |i: usize, s: &str| s.chars().enumerate().all(|(k, c)| chars.get(i + k) == Some(&c));
    while i < chars.len() {
        let c = chars[i];
        let keep = |out: &mut String, c: char| out.push(if c == '\n' { '\n' } else { c });
        let blank = |out: &mut String, c: char| out.push(if c == '\n' { '\n' } else { ' ' });
        match state {
            State::Code => {
                if at(i, "//") {
                    state = State::LineComment;
                    out.push_str("  ");
                    i += 2;
                    continue;
                } else if at(i, "/*") {
                    state = State::BlockComment(1);
                    out.push_str("  ");
                    i += 2;
                    continue;
                } else if c == '"' {
                    state = State::Str;
                } else if c == 'r'
                    && (at(i + 1, "\"") || at(i + 1, "#"))
                    && !(i > 0 && chars[i - 1].is_alphanumeric())
                {
                    let hashes = chars[i + 1..].iter().take_while(|c| **c == '#').count();
                    if chars.get(i + 1 + hashes) == Some(&'"') {
                        state = State::RawStr(hashes);
                        for _ in 0..hashes + 2 {
                            out.push(' ');
                        }
                        i += hashes + 2;
                        continue;
                    }
                } else if c == '\'' {
                    // A char literal ('"', '\'', '\n') is skipped whole; a lifetime is code.
                    let len = if chars.get(i + 1) == Some(&'\\') {
                        chars[i + 2..].iter().position(|c| *c == '\'').map(|p| p + 3)
                    } else if chars.get(i + 2) == Some(&'\'') {
                        Some(3)
                    } else {
                        None
                    };
                    if let Some(len) = len {
                        for k in 0..len {
                            blank(&mut out, chars[i + k]);
                        }
                        i += len;
                        continue;
                    }
                }
                blank(&mut out, c);
            }
            State::LineComment => {
                if c == '\n' {
                    state = State::Code;
                }
                keep(&mut out, c);
            }
            State::BlockComment(depth) => {
                if at(i, "*/") {
                    state = if depth == 1 {
                        State::Code
                    } else {
                        State::BlockComment(depth - 1)
                    };
                    out.push_str("  ");
                    i += 2;
                    continue;
                } else if at(i, "/*") {
                    state = State::BlockComment(depth + 1);
                }
                keep(&mut out, c);
            }
            State::Str => {
                if c == '\\' && i + 1 < chars.len() {
                    // An escape: `\"` does not end the string; a line continuation keeps
                    // its newline so line numbers stay right.
                    keep(&mut out, ' ');
                    keep(&mut out, chars[i + 1]);
                    i += 2;
                    continue;
                } else if c == '"' {
                    state = State::Code;
                    out.push(' ');
                } else {
                    keep(&mut out, c);
                }
            }
            State::RawStr(hashes) => {
                if c == '"' && chars[i + 1..].iter().take(hashes).filter(|c| **c == '#').count() == hashes {
                    state = State::Code;
                    for _ in 0..hashes + 1 {
                        out.push(' ');
                    }
                    i += hashes + 1;
                    continue;
                }
                keep(&mut out, c);
            }
        }
        i += 1;
    }
    out
}

/// Every file under `dir` that may cite ids (not the list itself).
fn files(dir: &Path, root: &Path, out: &mut Vec<PathBuf>) {
    let Ok(read) = fs::read_dir(dir) else { return };
    for entry in read.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let Ok(kind) = entry.file_type() else { continue };
        if kind.is_dir() {
            if !SKIPPED_DIRS.contains(&name.as_str()) && !name.starts_with('.') {
                files(&path, root, out);
            }
        } else if kind.is_file()
            && path
                .extension()
                .is_some_and(|e| EXTENSIONS.contains(&e.to_string_lossy().as_ref()))
            && path != root.join(LIST)
        {
            out.push(path);
        }
    }
}

/// Where each id is cited: the first file and line, for the failure message.
fn citations(root: &Path) -> BTreeMap<String, String> {
    let mut paths = Vec::new();
    files(root, root, &mut paths);
    paths.sort();
    let mut cited = BTreeMap::new();
    for path in paths {
        let Ok(text) = fs::read_to_string(&path) else {
            continue;
        };
        let text = if path.extension().is_some_and(|e| e == "rs") {
            rust_prose(&text)
        } else {
            text
        };
        let shown = path.strip_prefix(root).unwrap_or(&path).display().to_string();
        for (number, line) in text.lines().enumerate() {
            for (id, _) in ids_in(line) {
                cited
                    .entry(id)
                    .or_insert_with(|| format!("{shown}:{}", number + 1));
            }
        }
    }
    cited
}

/// Whether `file` defines a function `name` (`fn name(` or `fn name<` in Rust,
/// `def name(` in Python).
fn defines(file: &str, name: &str) -> bool {
    let keyword = if file.ends_with(".py") { "def " } else { "fn " };
    fs::read_to_string(root().join(file)).is_ok_and(|text| {
        text.match_indices(&format!("{keyword}{name}"))
            .any(|(at, found)| matches!(text[at + found.len()..].chars().next(), Some('(' | '<')))
    })
}

#[test]
fn every_cited_scenario_is_listed_and_every_listed_test_exists() {
    let root = root();
    let list = fs::read_to_string(root.join(LIST)).expect("docs/scenarios.md is readable");
    let entries =
        read_list(&list).unwrap_or_else(|errors| panic!("{LIST} is malformed:\n  {}", errors.join("\n  ")));

    let cited = citations(&root);
    let missing: Vec<String> = cited
        .iter()
        .filter(|(id, _)| !entries.contains_key(*id))
        .map(|(id, at)| format!("{id} (cited at {at})"))
        .collect();

    let mut absent = BTreeSet::new();
    for (id, entry) in &entries {
        for (file, name) in &entry.tests {
            if !defines(file, name) {
                absent.insert(format!("{id}: {file}::{name}"));
            }
        }
    }

    let covered = entries.values().filter(|e| !e.uncovered).count();
    println!(
        "{} ids cited, {} listed, {covered} covered",
        cited.len(),
        entries.len()
    );
    assert!(
        missing.is_empty(),
        "ids cited but not in {LIST} (add an entry for each):\n  {}",
        missing.join("\n  ")
    );
    assert!(
        absent.is_empty(),
        "tests named in {LIST} that their file does not define (renamed or moved?):\n  {}",
        absent.into_iter().collect::<Vec<_>>().join("\n  ")
    );
}

/// The documents point at the project's own list, not at notes outside the repository.
#[test]
fn no_document_links_outside_the_repository() {
    let root = root();
    let mut paths = Vec::new();
    files(&root, &root, &mut paths);
    let outside: Vec<String> = paths
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .filter(|p| {
            fs::read_to_string(p).is_ok_and(|t| t.contains("](../shared/") || t.contains("/work/shared"))
        })
        .map(|p| p.strip_prefix(&root).unwrap_or(p).display().to_string())
        .collect();
    assert!(
        outside.is_empty(),
        "documents linking outside the repository: {outside:?}"
    );
}

#[test]
fn ids_and_ranges_are_read_as_written() {
    let ids = |text: &str| ids_in(text).into_iter().map(|(id, _)| id).collect::<Vec<_>>();
    assert_eq!(ids("M3, V20 and G9."), ["M3", "V20", "G9"]);
    assert_eq!(
        ids("M1-M4; V16–V18; K2 - 3"),
        ["M1", "M2", "M3", "M4", "V16", "V17", "V18", "K2", "K3"]
    );
    assert!(ids("K8s G9_SEED m3-01 XM3 M3x M1234 v4").is_empty());
    let prose = rust_prose("let a = IpAddr::V4(x); // M3\nlet s = \"V5: bound\"; let c = '\"'; // K1\n");
    assert_eq!(ids(&prose), ["M3", "V5", "K1"]);
    assert_eq!(prose.lines().count(), 2);
}
