//! LMCache pull-socket frames parsed and grouped per holder in Rust, on any bytes (checks:
//! fuzz/rust/oracles/lmcache_push.rs).
#![no_main]

#[path = "../oracles/lmcache_push.rs"]
mod oracle;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| oracle::check(data));
