//! The README's configuration examples must be valid configs, so the docs cannot drift from the
//! code.

use std::path::Path;

use vramgate::config::Config;

#[test]
fn every_toml_block_in_the_readme_is_a_valid_config() {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in readme.lines() {
        match (&mut current, line.trim_start()) {
            (None, "```toml") => current = Some(String::new()),
            (Some(block), "```") => {
                blocks.push(std::mem::take(block));
                current = None;
            }
            (Some(block), _) => {
                block.push_str(line);
                block.push('\n');
            }
            (None, _) => {}
        }
    }
    assert!(blocks.len() >= 5, "expected the full example and one per probe, found {}", blocks.len());
    for block in &blocks {
        if let Err(e) = Config::parse(block, Some(Path::new("README.md"))) {
            panic!("README example does not parse: {e}\n---\n{block}");
        }
    }
}
