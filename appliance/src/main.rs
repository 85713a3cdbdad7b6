//! `ftvm`: see `ftvm --help`.

fn main() -> std::process::ExitCode {
    ftvm_appliance::cli::main()
}
