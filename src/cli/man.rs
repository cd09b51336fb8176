//! `vramgate man`: the manual pages, generated from the same clap definitions as the parser, so
//! they cannot drift from the real command line.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Command, CommandFactory};
use clap_mangen::Man;

#[derive(Debug, Args)]
#[command(after_help = "\
Without --dir, prints vramgate(1) (the overview and the list of subcommands) on stdout:
  vramgate man | man -l -
With --dir, writes vramgate.1 and one page per subcommand (vramgate-serve.1, vramgate-run.1, ...),
creating the directory if needed, and prints each file's path:
  vramgate man --dir ~/.local/share/man/man1")]
pub(super) struct ManArgs {
    /// Write every page into this directory instead of printing vramgate(1).
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
}

pub(super) fn run(args: ManArgs) -> ExitCode {
    match args.dir {
        None => match page(command()) {
            Ok(page) => super::completions::write_stdout(&page),
            Err(e) => super::fail(&e),
        },
        Some(dir) => match write_pages(&dir) {
            Ok(paths) => {
                for path in paths {
                    if !super::print_line(&path.display().to_string()) {
                        break;
                    }
                }
                ExitCode::SUCCESS
            }
            Err(e) => super::fail(&e),
        },
    }
}

/// The command line the pages describe: `help` is a clap built-in, not a subcommand worth a page.
fn command() -> Command {
    let mut command = super::Cli::command().disable_help_subcommand(true);
    // Building sets each subcommand's display name (`vramgate-serve`), which names its page.
    command.build();
    command
}

/// One page in roff, rendered into memory.
fn page(command: Command) -> anyhow::Result<Vec<u8>> {
    let mut page = Vec::new();
    man(command).render(&mut page).context("cannot render the man page")?;
    Ok(page)
}

/// The page of `command`, whose footer names vramgate and its version on every page (clap_mangen
/// would name the subcommand alone: "serve 0.1.0").
fn man(command: Command) -> Man {
    Man::new(command).source(format!("vramgate {}", env!("CARGO_PKG_VERSION")))
}

/// Writes the page of `vramgate` and of every visible subcommand, at every depth, into `dir`.
fn write_pages(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create the directory {}", dir.display()))?;
    let mut written = Vec::new();
    let mut pending = vec![command()];
    while let Some(command) = pending.pop() {
        // clap_mangen leaves hidden subcommands out of the lists in a page; they get no page either.
        pending.extend(command.get_subcommands().filter(|sub| !sub.is_hide_set()).cloned());
        let man = man(command);
        let path = dir.join(man.get_filename());
        let mut page = Vec::new();
        man.render(&mut page).context("cannot render the man page")?;
        std::fs::write(&path, page).with_context(|| format!("cannot write {}", path.display()))?;
        written.push(path);
    }
    written.sort();
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_visible_subcommand_gets_a_page_named_after_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let written = write_pages(dir.path()).expect("pages");
        let names: Vec<String> =
            written.iter().map(|p| p.file_name().expect("file name").to_string_lossy().into_owned()).collect();
        let top = command();
        for sub in top.get_subcommands() {
            let name = format!("vramgate-{}.1", sub.get_name());
            assert_eq!(names.contains(&name), !sub.is_hide_set(), "{name} in {names:?}");
        }
        assert!(names.contains(&"vramgate.1".to_owned()), "{names:?}");
        assert!(names.contains(&"vramgate-config-check.1".to_owned()), "nested subcommands get pages: {names:?}");
        assert!(!names.iter().any(|n| n.starts_with("vramgate-help")), "{names:?}");
        let serve = std::fs::read_to_string(dir.path().join("vramgate-serve.1")).expect("serve page");
        let title = format!(".TH vramgate-serve 1  \"vramgate {}\"", env!("CARGO_PKG_VERSION"));
        assert!(serve.lines().any(|line| line.trim_end() == title), "{title:?} in\n{serve}");
        assert!(serve.contains("listen"), "the serve page lists its options:\n{serve}");
    }
}
