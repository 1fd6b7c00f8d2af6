//! The controller's /lookup fast path (`http_fast::answer_with`) on any bytes.
//!
//! * no panic, `consumed` within the input and on request boundaries;
//! * the responses are exactly one well-formed `200` per answered request, each carrying the
//!   body the lookup returned for that request's body, `Connection: close` only on the last and
//!   only when the call says it closes;
//! * it stops only where it must: after the last answered request, the rest of the input is not
//!   a fast-path request whose lookup succeeds (unless the connection was closed).
//!
//! The first input byte picks the limits (small ones reach the "leave it to the general server"
//! branches with short inputs).
#![no_main]

#[path = "../oracles/http_fast.rs"]
mod oracle;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| oracle::check(data));
