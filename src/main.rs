#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    tokenvault::cli::run()
}
