//! Black-box tests: the real `tokenvault` binary over real HTTP.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod abuse;
mod audit;
mod authz;
mod backup;
mod batch;
mod charges;
pub mod cli;
mod contract;
mod corruption;
mod crash;
mod durability;
mod export;
mod helpers;
mod hsm;
mod import;
mod keys;
mod layering;
mod lifecycle;
mod limits;
mod observability;
mod openapi;
mod payments;
mod readme;
mod replicas;
mod tls;
mod tokens;
mod voice;
