//! `tokenvault-mock-psp`: the local PSP simulator (Adyen-style `POST /payments`) with
//! deterministic outcomes, for dev and tests. A separate binary, so that the vault's
//! production binary (and its container image) carries no simulator that records card
//! numbers. See `src/psp/mock.rs` for the outcome table.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// A local PSP simulator (Adyen-style `POST /payments`) with deterministic outcomes, for dev and tests.
#[derive(Parser)]
#[command(name = "tokenvault-mock-psp", version)]
struct Args {
    /// Listen address.
    #[arg(long, default_value = "127.0.0.1:8081", value_name = "ADDR")]
    listen: SocketAddr,
    /// File holding the API key to require [default: the dev key the vault uses with --psp-url].
    #[arg(long, value_name = "FILE")]
    api_key_file: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tokenvault::telemetry::init(tokenvault::config::LogFormat::Pretty);
    tokenvault::psp::mock::run(args.listen, args.api_key_file)
}
