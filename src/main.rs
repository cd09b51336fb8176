fn main() -> std::process::ExitCode {
    vramgate::cli::main()
}
