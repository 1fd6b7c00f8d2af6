//! Chunk keys: chained, seeded xxh3-64 over little-endian u32 tokens (see README.md).
//!
//! `key[0] = xxh3_64(le32(chunk[0]), seed)`,
//! `key[i] = xxh3_64(le64(key[i-1]) ++ le32(chunk[i]), seed)`; the final partial chunk counts.
//! A key therefore names a whole prefix (a node of the radix tree), not one chunk's tokens.

use xxhash_rust::xxh3::xxh3_64_with_seed;

/// A chained prefix hash: the key of the chunk prefix `tokens[..end of chunk i]`.
pub type PrefixHash = u64;

/// Tokens read front to back, a chunk at a time: a slice, or a request body whose numbers are
/// read only as far as a walk hashes (`json::LazyTokens`).
pub trait TokenCursor {
    /// Tokens not yet taken.
    fn remaining(&self) -> usize;
    /// The next `n` tokens (`n <= remaining()`).
    fn take(&mut self, n: usize) -> &[u32];
}

impl TokenCursor for &[u32] {
    #[inline]
    fn remaining(&self) -> usize {
        self.len()
    }

    #[inline]
    fn take(&mut self, n: usize) -> &[u32] {
        let (head, rest) = self.split_at(n);
        *self = rest;
        head
    }
}

/// Lazily yields the keys of successive chunks, so a walk can stop hashing as soon as it stops
/// matching. Keeps one scratch buffer of `8 + 4 * chunk_size` bytes.
pub struct ChunkHasher<T> {
    tokens: T,
    chunk_size: usize,
    seed: u64,
    prev: Option<u64>,
    buf: Vec<u8>,
}

impl<'a> ChunkHasher<&'a [u32]> {
    /// `chunk_size` must be > 0 (checked by the callers that take it from users).
    pub fn new(tokens: &'a [u32], chunk_size: usize, seed: u64) -> Self {
        Self::after(None, tokens, chunk_size, seed)
    }

    /// The keys of `tokens` as the continuation of a prefix whose last key is `parent`
    /// (`None`: `tokens` start the sequence). Engine events announce blocks after a parent
    /// block, so their keys continue the parent's chain.
    pub fn after(parent: Option<u64>, tokens: &'a [u32], chunk_size: usize, seed: u64) -> Self {
        ChunkHasher::over(parent, tokens, chunk_size, seed)
    }
}

impl<T: TokenCursor> ChunkHasher<T> {
    /// `after` for tokens from any cursor.
    pub fn over(parent: Option<u64>, tokens: T, chunk_size: usize, seed: u64) -> Self {
        ChunkHasher {
            tokens,
            chunk_size: chunk_size.max(1),
            seed,
            prev: parent,
            buf: Vec::new(),
        }
    }

    /// Number of tokens in the chunk the next call to `next` hashes (0 when done).
    #[inline]
    pub fn next_len(&self) -> usize {
        self.tokens.remaining().min(self.chunk_size)
    }
}

impl<T: TokenCursor> Iterator for ChunkHasher<T> {
    type Item = PrefixHash;

    #[inline]
    fn next(&mut self) -> Option<PrefixHash> {
        let n = self.next_len();
        if n == 0 {
            return None;
        }
        let chunk = self.tokens.take(n);
        let head = if self.prev.is_some() { 8 } else { 0 };
        self.buf.resize(head + 4 * n, 0);
        if let Some(prev) = self.prev {
            self.buf[..8].copy_from_slice(&prev.to_le_bytes());
        }
        for (dst, t) in self.buf[head..].chunks_exact_mut(4).zip(chunk) {
            dst.copy_from_slice(&t.to_le_bytes());
        }
        let h = xxh3_64_with_seed(&self.buf, self.seed);
        self.prev = Some(h);
        Some(h)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = num_chunks(self.tokens.remaining(), self.chunk_size);
        (n, Some(n))
    }
}

/// Number of chunks `num_tokens` tokens make (the last may be partial).
#[inline]
pub fn num_chunks(num_tokens: usize, chunk_size: usize) -> usize {
    num_tokens.div_ceil(chunk_size.max(1))
}

/// All chunk keys of `tokens`.
pub fn chunk_hashes(tokens: &[u32], chunk_size: usize, seed: u64) -> Vec<PrefixHash> {
    ChunkHasher::new(tokens, chunk_size, seed).collect()
}

/// The chunk keys of `tokens` continuing the chain after the key `parent`.
pub fn chunk_hashes_after(
    parent: Option<u64>,
    tokens: &[u32],
    chunk_size: usize,
    seed: u64,
) -> Vec<PrefixHash> {
    ChunkHasher::after(parent, tokens, chunk_size, seed).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continuing_after_a_parent_equals_hashing_the_whole_prefix() {
        let tokens: Vec<u32> = (0..100).collect();
        let whole = chunk_hashes(&tokens, 16, 7);
        for cut in 0..whole.len() {
            let parent = if cut == 0 { None } else { Some(whole[cut - 1]) };
            let rest = chunk_hashes_after(parent, &tokens[cut * 16..], 16, 7);
            assert_eq!(rest, whole[cut..]);
        }
    }

    /// The vector documented in README.md; also asserted by tests/test_hashing.py.
    #[test]
    fn documented_vector() {
        let tokens: Vec<u32> = (1..=10).collect();
        let keys = chunk_hashes(&tokens, 4, 0);
        assert_eq!(keys.len(), 3);
        // key 0 = xxh3(le32(1,2,3,4)); key 1 chains key 0.
        let mut b0 = Vec::new();
        for t in 1u32..=4 {
            b0.extend_from_slice(&t.to_le_bytes());
        }
        assert_eq!(keys[0], xxh3_64_with_seed(&b0, 0));
        let mut b1 = keys[0].to_le_bytes().to_vec();
        for t in 5u32..=8 {
            b1.extend_from_slice(&t.to_le_bytes());
        }
        assert_eq!(keys[1], xxh3_64_with_seed(&b1, 0));
        assert_eq!(keys, DOC_VECTOR.to_vec());
        assert_eq!(chunk_hashes(&tokens, 4, 7), DOC_VECTOR_SEED7.to_vec());
    }

    pub const DOC_VECTOR: [u64; 3] = [
        8052976908588476977,
        7336208305298077521,
        2874354060571158124,
    ];
    pub const DOC_VECTOR_SEED7: [u64; 3] = [
        470153853844883964,
        15613741393757465008,
        8796433712124139337,
    ];

    #[test]
    fn empty_and_lazy() {
        assert!(chunk_hashes(&[], 256, 0).is_empty());
        let toks: Vec<u32> = (0..1000).collect();
        let all = chunk_hashes(&toks, 256, 3);
        assert_eq!(all.len(), 4);
        let mut h = ChunkHasher::new(&toks, 256, 3);
        assert_eq!(h.next_len(), 256);
        assert_eq!(h.next(), Some(all[0]));
        assert_eq!(h.size_hint(), (3, Some(3)));
        // prefixes share keys
        assert_eq!(chunk_hashes(&toks[..512], 256, 3), all[..2].to_vec());
        assert_ne!(chunk_hashes(&toks, 256, 4), all);
    }
}
