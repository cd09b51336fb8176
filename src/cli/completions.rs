//! `vramgate completions SHELL`: the shell completion script, generated from the same clap
//! definitions as the parser, so it cannot drift from the real command line.

use std::process::ExitCode;

use clap::{Args, Command, CommandFactory};
use clap_complete::Shell;

#[derive(Debug, Args)]
#[command(after_help = "\
Where to put the script (each shell loads it from there on its next start):
  bash  ~/.local/share/bash-completion/completions/vramgate
  zsh   a directory in $fpath, as _vramgate (e.g. ~/.zfunc/_vramgate with fpath=(~/.zfunc $fpath)
        before compinit in ~/.zshrc)
  fish  ~/.config/fish/completions/vramgate.fish

Example: vramgate completions bash > ~/.local/share/bash-completion/completions/vramgate")]
pub(super) struct CompletionsArgs {
    /// The shell to write the completion script for.
    shell: Shell,
}

pub(super) fn run(args: CompletionsArgs) -> ExitCode {
    let script = script(args.shell);
    write_stdout(&script)
}

/// Writes generated text to stdout; a closed pipe (`vramgate man | head`) ends the command with a
/// failure status instead of the panic a generator would raise on a failed write.
pub(super) fn write_stdout(text: &[u8]) -> ExitCode {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text).and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) => ExitCode::from(super::EXIT_FAILURE),
    }
}

/// The completion script for `shell`, offering exactly what `--help` shows.
pub(super) fn script(shell: Shell) -> Vec<u8> {
    let mut command = without_hidden_subcommands(super::Cli::command());
    let name = command.get_name().to_owned();
    // Generated into memory: clap_complete panics on a failed write, and stdout may be a closed pipe.
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut command, name, &mut script);
    script
}

/// `command` with its hidden subcommands left out, at every depth. clap_complete completes hidden
/// subcommands too (clap issue 1335), and `Command` cannot remove a subcommand, so a command that
/// has hidden ones is rebuilt from its name, texts, arguments, groups and visible subcommands:
/// nothing of the command line is restated here, so it cannot drift from `Cli`.
fn without_hidden_subcommands(command: Command) -> Command {
    if !command.get_subcommands().any(Command::is_hide_set) {
        return command.mut_subcommands(without_hidden_subcommands);
    }
    let mut rebuilt = Command::new(command.get_name().to_owned())
        .args(command.get_arguments().cloned())
        .groups(command.get_groups().cloned())
        .subcommands(
            command.get_subcommands().filter(|sub| !sub.is_hide_set()).cloned().map(without_hidden_subcommands),
        )
        .propagate_version(command.is_propagate_version_set())
        .subcommand_required(command.is_subcommand_required_set())
        .disable_help_subcommand(command.is_disable_help_subcommand_set());
    if let Some(about) = command.get_about() {
        rebuilt = rebuilt.about(about.clone());
    }
    if let Some(about) = command.get_long_about() {
        rebuilt = rebuilt.long_about(about.clone());
    }
    if let Some(version) = command.get_version() {
        rebuilt = rebuilt.version(version.to_owned());
    }
    rebuilt
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A command line with a hidden subcommand at the top and one level down.
    fn with_hidden() -> Command {
        Command::new("tool")
            .version("1.2.3")
            .propagate_version(true)
            .subcommand(
                Command::new("shown").about("A visible subcommand").arg(clap::Arg::new("flagged").long("flagged")),
            )
            .subcommand(Command::new("secret-internal").hide(true))
            .subcommand(
                Command::new("group")
                    .subcommand(Command::new("child-visible"))
                    .subcommand(Command::new("child-secret").hide(true)),
            )
    }

    #[test]
    fn hidden_subcommands_are_left_out_at_every_depth() {
        let pruned = without_hidden_subcommands(with_hidden());
        let names: Vec<&str> = pruned.get_subcommands().map(Command::get_name).collect();
        assert_eq!(names, ["shown", "group"]);
        let group = pruned.find_subcommand("group").expect("group kept");
        let children: Vec<&str> = group.get_subcommands().map(Command::get_name).collect();
        assert_eq!(children, ["child-visible"]);
        // What a visible subcommand carries survives the rebuild.
        let shown = pruned.find_subcommand("shown").expect("shown kept");
        assert!(shown.get_arguments().any(|arg| arg.get_long() == Some("flagged")));
        assert_eq!(pruned.get_version(), Some("1.2.3"));
    }

    #[test]
    fn scripts_never_offer_a_hidden_subcommand() {
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let mut command = without_hidden_subcommands(with_hidden());
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut command, "tool", &mut script);
            let script = String::from_utf8(script).expect("utf-8");
            assert!(script.contains("shown") && script.contains("child-visible"), "{shell}: {script}");
            assert!(!script.contains("secret"), "{shell} offers a hidden subcommand:\n{script}");
        }
    }

    #[test]
    fn vramgates_own_hidden_subcommands_stay_out_of_its_scripts() {
        let hidden: Vec<String> = super::super::Cli::command()
            .get_subcommands()
            .filter(|sub| sub.is_hide_set())
            .map(|sub| sub.get_name().to_owned())
            .collect();
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let text = String::from_utf8(script(shell)).expect("utf-8");
            assert!(text.contains("serve"), "{shell}");
            for name in &hidden {
                // Every generator quotes or delimits a subcommand's name; a bare substring test
                // would also match longer names that merely contain it.
                let offered =
                    text.split(|c: char| !(c.is_alphanumeric() || c == '-' || c == '_')).any(|word| word == name);
                assert!(!offered, "{shell} offers the hidden subcommand {name}");
            }
        }
    }
}
