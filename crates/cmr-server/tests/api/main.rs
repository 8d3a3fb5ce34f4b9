//! The API through the router, without a socket: the flow, and the attacks answered with the right
//! problem code and the state unchanged. One test binary, one module per area.
#![allow(clippy::unwrap_used)] // Test code: a panic is a failed test.

mod common;
mod consent;
mod contract;
mod flow;
mod robustness;
mod security;
