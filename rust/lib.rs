//! lmcache_rs: a chunked-prefix radix index of KV-cache holders, with lock-free reads.
//! See rust/README.md for the glossary, the module map and the design.

// ---- the core (plain Rust, no PyO3) ----
pub mod engine_map;
pub mod error;
pub mod hash;
pub mod holders;
pub mod http_fast;
pub mod index;
pub mod json;
pub mod keyspace;
pub mod kv_copy;
pub mod kv_payload;
pub mod lmcache_push;
pub mod memory;
pub mod msgpack_read;
pub mod pyhash;
pub mod shared;
pub mod snapshot;
pub mod table;
pub mod write_behind;

#[cfg(test)]
mod fuzz_corpus_tests;
#[cfg(test)]
mod model_tests;

// ---- the Python binding layer ----
#[cfg(feature = "python")]
mod py;

#[cfg(feature = "python")]
#[pyo3::pymodule]
mod _core {
    use pyo3::prelude::*;

    #[pymodule_export]
    use crate::py::engine_map::{parse_kv_batch, PyEngineMap, PyEngineOps, PyParsedBatch};
    #[pymodule_export]
    use crate::py::index::{chunk_hashes, lookup_body_names, runtime_info, PyIndex};
    #[pymodule_export]
    use crate::py::kv_copy::copy_cpu_blocks;
    #[pymodule_export]
    use crate::py::lmcache_push::read_lmcache_push;
    #[pymodule_export]
    use crate::py::pyhash::{lmcache_chunk_hashes, python_str_hash};

    #[pymodule_init]
    fn init(m: &Bound<'_, PyModule>) -> PyResult<()> {
        let t = crate::py::errors::types(m.py())?;
        m.add("LMCacheError", t.lmcache.bind(m.py()))?;
        m.add("InvalidArgumentError", t.invalid_argument.bind(m.py()))?;
        m.add("InvalidTypeError", t.invalid_type.bind(m.py()))?;
        m.add("SnapshotError", t.snapshot.bind(m.py()))?;
        m.add("__version__", env!("CARGO_PKG_VERSION"))?;
        Ok(())
    }
}
