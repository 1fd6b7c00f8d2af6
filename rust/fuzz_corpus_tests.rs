//! The checked-in fuzz corpora (fuzz/corpus/<target>/) replayed through the Rust fuzz targets'
//! own checks (fuzz/rust/oracles/, shared with the cargo-fuzz targets), on the stable
//! toolchain: `cargo test` runs them where cargo-fuzz and nightly are not installed.

// Each oracle names this crate `_core`, as the fuzz crate does.
mod http_fast {
    use crate as _core;
    include!("../fuzz/rust/oracles/http_fast.rs");
}
mod lookup_body {
    use crate as _core;
    include!("../fuzz/rust/oracles/lookup_body.rs");
}
mod snapshot_load {
    use crate as _core;
    include!("../fuzz/rust/oracles/snapshot_load.rs");
}
mod kv_payload {
    use crate as _core;
    include!("../fuzz/rust/oracles/kv_payload.rs");
}
mod lmcache_push {
    use crate as _core;
    include!("../fuzz/rust/oracles/lmcache_push.rs");
}

fn replay(target: &str, check: fn(&[u8])) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files = 0;
    for entry in std::fs::read_dir(&dir).expect("the corpus directory") {
        let path = entry.expect("a corpus entry").path();
        let data = std::fs::read(&path).expect("a corpus file");
        let outcome = std::panic::catch_unwind(|| check(&data));
        assert!(outcome.is_ok(), "{target}: {} is a finding", path.display());
        files += 1;
    }
    assert!(
        files >= 10,
        "{target}: only {files} corpus files in {}",
        dir.display()
    );
}

#[test]
fn lookup_body_corpus() {
    replay("lookup_body", lookup_body::check);
}

#[test]
fn http_fast_corpus() {
    replay("http_fast", http_fast::check);
}

#[test]
fn snapshot_load_corpus() {
    replay("snapshot_load", snapshot_load::check);
}

#[test]
fn kv_payload_corpus() {
    replay("kv_payload", kv_payload::check);
}

#[test]
fn lmcache_push_corpus() {
    replay("lmcache_push", lmcache_push::check);
}
