//! Snapshot files from any bytes: `snapshot::load` returns an index or an error, never
//! panics or runs out of memory on a hostile count; an index it returns passes `check()`,
//! and its dump loads back to the same observable index (stats, holders, workers). (Dumps are
//! not byte-canonical: entry order follows the hash table's layout, which may differ.)
//!
//! The first input byte chooses whether the trailing xxh3 checksum is recomputed over the
//! rest before loading, so mutated files get past the checksum and exercise every field check.
#![no_main]

#[path = "../oracles/snapshot_load.rs"]
mod oracle;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| oracle::check(data));
