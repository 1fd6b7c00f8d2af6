//! The /lookup body parser and the response writer, on any bytes.
//!
//! * `parse_lookup_body` returns tokens or an error, never panics;
//! * when it returns tokens, serde_json's own reading of the body agrees: an object whose
//!   single "tokens" key is a list of integers in u32 range, each spelled as plain digits or
//!   `-0` (read as 0), equal to what was returned;
//! * `parse_lookup_tokens` (which reads the numbers only as they are taken) accepts and refuses
//!   what `parse_lookup_body` does, with the same tokens, taken whole or a few at a time;
//! * the response rendered for any event id and instance/location names read from the
//!   input is valid JSON and gives those strings back.
#![no_main]

#[path = "../oracles/lookup_body.rs"]
mod oracle;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| oracle::check(data));
