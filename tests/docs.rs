//! The docs cannot drift from the code: every config example in the README and `docs/` must be a
//! valid config, every doc must be reachable from the README, and every link between them must
//! resolve to a file in the repository.

mod common;

use std::path::{Path, PathBuf};

use vramgate::config::Config;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The README and every Markdown file in `docs/`.
fn documents() -> Vec<PathBuf> {
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .expect("read docs/")
        .map(|entry| entry.expect("dir entry").path())
        .filter(|path| path.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    docs.insert(0, root().join("README.md"));
    docs
}

/// The targets of the Markdown links `[text](target)` in a text.
fn link_targets(text: &str) -> Vec<String> {
    let mut targets = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("](") {
        rest = &rest[at + 2..];
        if let Some(end) = rest.find(')') {
            targets.push(rest[..end].to_string());
            rest = &rest[end..];
        }
    }
    targets
}

#[test]
fn every_toml_block_in_the_docs_is_a_valid_config() {
    let mut checked = 0;
    for doc in documents() {
        let text = std::fs::read_to_string(&doc).expect("read a doc");
        for block in common::fenced_blocks(&text, "toml") {
            if let Err(e) = Config::parse(&block, Some(&doc)) {
                panic!("{}: example does not parse: {e}\n---\n{block}", doc.display());
            }
            checked += 1;
        }
    }
    // The README's setup, the full reference, one per probe, the recipes, the Python app's config.
    assert!(checked >= 11, "expected the docs' config examples, found {checked}");
}

#[test]
fn every_doc_is_linked_from_the_readme_and_every_link_resolves_inside_the_repository() {
    let readme = std::fs::read_to_string(root().join("README.md")).expect("read README.md");
    let readme_targets = link_targets(&readme);
    for doc in documents().iter().skip(1) {
        let name = format!("docs/{}", doc.file_name().and_then(|n| n.to_str()).expect("a file name"));
        assert!(readme_targets.iter().any(|t| t == &name), "README.md does not link to {name}");
    }
    for doc in documents() {
        let text = std::fs::read_to_string(&doc).expect("read a doc");
        let dir = doc.parent().expect("a doc's directory");
        for target in link_targets(&text) {
            if target.starts_with("http://") || target.starts_with("https://") {
                continue;
            }
            let path = target.split('#').next().unwrap_or_default();
            if path.is_empty() {
                continue; // a link within the same page
            }
            let resolved = dir.join(path);
            assert!(resolved.exists(), "{}: the link {target} points at nothing", doc.display());
            let canonical = resolved.canonicalize().expect("canonical path");
            assert!(
                canonical.starts_with(root().canonicalize().expect("canonical root")),
                "{}: the link {target} leaves the repository",
                doc.display()
            );
        }
    }
}

#[test]
fn the_readme_is_short_and_speaks_to_users() {
    let readme = std::fs::read_to_string(root().join("README.md")).expect("read README.md");
    let lines = readme.lines().count();
    assert!(lines <= 200, "README.md has {lines} lines; the reference belongs in docs/");
    for doc in documents() {
        let text = std::fs::read_to_string(&doc).expect("read a doc").to_lowercase();
        // "Seeds" were the project's internal name for the apps it was built for; users never
        // met them.
        for word in ["seed 0", "seeds", "seed's"] {
            assert!(!text.contains(word), "{} speaks of {word:?}", doc.display());
        }
    }
}
