//! The `worldline` binary: one artifact, a subcommand per role.

fn main() -> std::process::ExitCode {
    worldline::cli::main()
}
