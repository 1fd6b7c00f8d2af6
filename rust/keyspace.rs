//! Key spaces: which chain of chunk keys an index uses (see README.md, "Key spaces").
//!
//! Both chains name a chunk prefix by a 64-bit key, so both live in the same table; an index
//! holds keys of exactly one space, fixed when it is made. Walks pick the hasher once per call
//! (`Core::walk` matches on the space and runs a loop monomorphised for its hasher), so the
//! per-chunk loop has no dispatch.

use crate::error::{Error, Result};
use crate::hash::{ChunkHasher, PrefixHash, TokenCursor};
use crate::pyhash::LmcacheHasher;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeySpace {
    /// This project's chained seeded xxh3-64 (`hash.rs`).
    Xxh3 { seed: u64 },
    /// LMCache's chain of CPython builtin `hash()`es (`pyhash.rs`), started from `none_hash`.
    /// Keys are stored as the two's-complement bit pattern of the signed hash.
    LmcacheBuiltin { none_hash: i64 },
}

impl KeySpace {
    pub const XXH3: &'static str = "xxh3";
    pub const LMCACHE_BUILTIN: &'static str = "lmcache_builtin";

    /// The space called `name`; `seed` belongs to xxh3 and `none_hash` to lmcache_builtin, and
    /// neither may be set for the other space (a silently ignored parameter would make keys
    /// that match no worker's).
    pub fn from_parts(name: &str, seed: u64, none_hash: i64) -> Result<Self> {
        match name {
            Self::XXH3 if none_hash != 0 => Err(Error::arg(
                "none_hash applies to key_space=\"lmcache_builtin\" only",
            )),
            Self::XXH3 => Ok(KeySpace::Xxh3 { seed }),
            Self::LMCACHE_BUILTIN if seed != 0 => Err(Error::arg(
                "key_space=\"lmcache_builtin\" takes no seed (its keys depend on none_hash only)",
            )),
            Self::LMCACHE_BUILTIN => Ok(KeySpace::LmcacheBuiltin { none_hash }),
            other => Err(Error::arg(format!(
                "unknown key_space {other:?} (expected \"xxh3\" or \"lmcache_builtin\")"
            ))),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            KeySpace::Xxh3 { .. } => Self::XXH3,
            KeySpace::LmcacheBuiltin { .. } => Self::LMCACHE_BUILTIN,
        }
    }

    /// The xxh3 seed (0 for lmcache_builtin).
    pub fn seed(&self) -> u64 {
        match self {
            KeySpace::Xxh3 { seed } => *seed,
            KeySpace::LmcacheBuiltin { .. } => 0,
        }
    }

    /// The chain's starting key (0 for xxh3).
    pub fn none_hash(&self) -> i64 {
        match self {
            KeySpace::Xxh3 { .. } => 0,
            KeySpace::LmcacheBuiltin { none_hash } => *none_hash,
        }
    }

    /// All chunk keys of `tokens` in this space.
    pub fn keys(&self, tokens: &[u32], chunk_size: usize) -> Vec<PrefixHash> {
        match *self {
            KeySpace::Xxh3 { seed } => ChunkHasher::new(tokens, chunk_size, seed).collect(),
            KeySpace::LmcacheBuiltin { none_hash } => {
                LmcacheHasher::new(tokens, chunk_size, none_hash).collect()
            }
        }
    }
}

impl std::fmt::Display for KeySpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeySpace::Xxh3 { seed } => write!(f, "key_space=\"xxh3\", seed={seed}"),
            KeySpace::LmcacheBuiltin { none_hash } => {
                write!(f, "key_space=\"lmcache_builtin\", none_hash={none_hash}")
            }
        }
    }
}

/// A lazy chain of chunk keys that also tells how long its next chunk is (the walk sums real
/// chunk lengths, the last chunk may be partial).
pub trait ChunkKeys: Iterator<Item = PrefixHash> {
    fn next_len(&self) -> usize;
}

impl<T: TokenCursor> ChunkKeys for ChunkHasher<T> {
    #[inline]
    fn next_len(&self) -> usize {
        ChunkHasher::next_len(self)
    }
}

impl<T: TokenCursor> ChunkKeys for LmcacheHasher<T> {
    #[inline]
    fn next_len(&self) -> usize {
        LmcacheHasher::next_len(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::chunk_hashes;
    use crate::pyhash::lmcache_chunk_hashes;

    #[test]
    fn parts() {
        assert_eq!(
            KeySpace::from_parts("xxh3", 7, 0).unwrap(),
            KeySpace::Xxh3 { seed: 7 }
        );
        assert_eq!(
            KeySpace::from_parts("lmcache_builtin", 0, -3).unwrap(),
            KeySpace::LmcacheBuiltin { none_hash: -3 }
        );
        assert!(KeySpace::from_parts("lmcache_builtin", 1, 0).is_err());
        assert!(KeySpace::from_parts("xxh3", 0, 5).is_err());
        assert!(KeySpace::from_parts("sha256", 0, 0).is_err());
        let ks = KeySpace::LmcacheBuiltin { none_hash: -3 };
        assert_eq!(
            (ks.name(), ks.seed(), ks.none_hash()),
            ("lmcache_builtin", 0, -3)
        );
    }

    #[test]
    fn keys_follow_the_space() {
        let toks: Vec<u32> = (0..700).collect();
        assert_eq!(
            KeySpace::Xxh3 { seed: 3 }.keys(&toks, 256),
            chunk_hashes(&toks, 256, 3)
        );
        let signed = lmcache_chunk_hashes(&toks, 256, i64::MIN);
        let stored: Vec<u64> = signed.iter().map(|k| *k as u64).collect();
        assert_eq!(
            KeySpace::LmcacheBuiltin {
                none_hash: i64::MIN
            }
            .keys(&toks, 256),
            stored
        );
    }
}
