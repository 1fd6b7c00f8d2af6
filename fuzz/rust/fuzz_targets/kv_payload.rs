//! Engine KV-event batch payloads parsed in Rust and applied to an engine map, on any bytes
//! (checks: fuzz/rust/oracles/kv_payload.rs).
#![no_main]

#[path = "../oracles/kv_payload.rs"]
mod oracle;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| oracle::check(data));
