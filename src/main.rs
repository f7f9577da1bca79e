//! Thin entry point: everything lives in the library (see `cli::main`).
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    outbox_relay::cli::main()
}
