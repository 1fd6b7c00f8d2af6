//! The Python binding layer: converts Python values to core types and back; no index logic.

pub mod convert;
pub mod engine_map;
pub mod errors;
pub mod index;
pub mod kv_copy;
pub mod lmcache_push;
pub mod pyhash;
