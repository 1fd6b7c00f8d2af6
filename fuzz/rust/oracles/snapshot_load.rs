// Snapshot files from any bytes: `snapshot::load` returns an index or an error, never
// panics or runs out of memory on a hostile count; an index it returns passes `check()`,
// and its dump loads back to the same observable index (stats, holders, workers). (Dumps are
// not byte-canonical: entry order follows the hash table's layout, which may differ.)
//
// The first input byte chooses whether the trailing xxh3 checksum is recomputed over the
// rest before loading, so mutated files get past the checksum and exercise every field check.

use std::path::PathBuf;

use _core::keyspace::KeySpace;
use _core::snapshot::{dump, load};
use xxhash_rust::xxh3::xxh3_64;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::var_os("FUZZ_SCRATCH")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    dir.join(format!("lmcache-fuzz-{}-{name}", std::process::id()))
}

/// One input through the target's checks; panics on a finding.
pub fn check(data: &[u8]) {
    if data.is_empty() {
        return;
    }
    let mut file = data[1..].to_vec();
    if data[0] & 1 == 1 && file.len() >= 8 {
        let n = file.len() - 8;
        let sum = xxh3_64(&file[..n]).to_le_bytes();
        file[n..].copy_from_slice(&sum);
    }
    let chunk_size = if data[0] & 2 == 2 { 256 } else { 4 };
    let key_space = match data[0] & 12 {
        0 => KeySpace::Xxh3 { seed: 7 },
        4 => KeySpace::Xxh3 { seed: 0 },
        8 => KeySpace::LmcacheBuiltin { none_hash: -7 },
        _ => KeySpace::LmcacheBuiltin { none_hash: 0 },
    };
    let path = scratch("in");
    std::fs::write(&path, &file).expect("scratch file");
    let loaded = load(&path, chunk_size, key_space);
    let _ = std::fs::remove_file(&path);
    if let Ok((core, log_seq)) = loaded {
        core.check().expect("a loaded snapshot breaks an invariant");
        let first = scratch("first");
        dump(&core, &first, log_seq).expect("dump of a loaded snapshot");
        let (again, seq_again) = load(&first, chunk_size, key_space).expect("load of our own dump");
        assert_eq!(log_seq, seq_again, "dump + load changed the log position");
        again.check().expect("our own dump breaks an invariant");
        let _ = std::fs::remove_file(&first);
        let observable = |c: &_core::index::Core| {
            let mut stats = c.stats();
            stats.retain(|(k, _)| *k != "bytes");
            let mut holders = c.holder_counts();
            holders.sort();
            let mut workers = c.workers();
            workers.sort();
            (stats, holders, workers)
        };
        assert_eq!(
            observable(&core),
            observable(&again),
            "dump + load changed the index"
        );
    }
}
