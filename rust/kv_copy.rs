//! Copying KV blocks out of vLLM's CPU paged cache into the store's token-major layout.
//!
//! vLLM's CPU attention keeps a layer as `[num_blocks, H, N, 2D]`: per block and head, first K
//! transposed (`K[n][d]` at `d*N + n`), then V row-major (`V[n][d]` at `N*D + n*D + d`). The
//! store keeps a layer's tokens as `[2, T, H, D]`: K of every token, then V. Torch does this
//! reordering with one strided gather per block, element by element (1.5-2 GB/s on the CPUs
//! measured); here K is transposed in small tiles and V copied row by row, which runs at
//! memory speed and is most of what a save costs on a prefill miss.

use crate::error::{Error, Result};

/// The shape of one layer of vLLM's CPU paged cache, in elements.
#[derive(Debug, Clone, Copy)]
pub struct CpuPaged {
    pub heads: usize,
    pub block_size: usize,
    pub head_dim: usize,
    /// Elements from one block to the next (at least `heads * block_size * 2 * head_dim`).
    pub block_stride: usize,
}

impl CpuPaged {
    fn block_len(&self) -> Option<usize> {
        self.heads
            .checked_mul(self.block_size)?
            .checked_mul(self.head_dim)?
            .checked_mul(2)
    }
}

/// Copy the first `tokens` tokens of `blocks` (a request's blocks in token order; the last may
/// be partly filled) from `src`, one layer in vLLM's CPU layout, into `dst`, `[2, tokens, H, D]`.
/// Every size and block index is checked against the slices before anything is copied.
pub fn copy_out<T: Copy>(
    layout: &CpuPaged,
    src: &[T],
    blocks: &[u64],
    tokens: usize,
    dst: &mut [T],
) -> Result<()> {
    let CpuPaged {
        heads,
        block_size: n,
        head_dim: d,
        block_stride,
    } = *layout;
    let block_len = layout
        .block_len()
        .filter(|&len| len > 0 && block_stride >= len)
        .ok_or_else(|| Error::arg(format!("bad CPU cache layout {layout:?}")))?;
    let row = heads * d; // one token of K (or V) in dst
    if tokens > blocks.len() * n || tokens + n <= blocks.len() * n {
        return Err(Error::arg(format!(
            "{tokens} tokens do not fill {} blocks of {n} (the last may be partial)",
            blocks.len()
        )));
    }
    if dst.len() != 2 * tokens * row {
        return Err(Error::arg(format!(
            "destination holds {} elements, {tokens} tokens need {}",
            dst.len(),
            2 * tokens * row
        )));
    }
    for &b in blocks {
        let end = usize::try_from(b)
            .ok()
            .and_then(|b| b.checked_mul(block_stride))
            .and_then(|start| start.checked_add(block_len));
        if end.is_none_or(|end| end > src.len()) {
            return Err(Error::arg(format!(
                "block {b} is outside the cache ({} elements, {block_stride} a block)",
                src.len()
            )));
        }
    }
    let (dst_k, dst_v) = dst.split_at_mut(tokens * row);
    for (i, &b) in blocks.iter().enumerate() {
        let first = i * n; // the block's first token in dst
        let count = n.min(tokens - first);
        let block = &src[b as usize * block_stride..][..block_len];
        for h in 0..heads {
            let k = &block[h * n * 2 * d..][..n * d]; // [d][n]
            let v = &block[h * n * 2 * d + n * d..][..n * d]; // [n][d]
            transpose_into(k, n, d, count, &mut dst_k[first * row + h * d..], row);
            for t in 0..count {
                dst_v[(first + t) * row + h * d..][..d].copy_from_slice(&v[t * d..][..d]);
            }
        }
    }
    Ok(())
}

/// `out[t * out_stride + j] = k[j * n + t]` for t < count, j < d: a `[d][n]` matrix's first
/// `count` columns as rows. 4-byte elements go 4x4 at a time through SSE2 registers (four
/// loads of a row's 4 neighbours, four unpacks, four stores); the edges, and 2-byte elements,
/// one at a time.
#[inline]
fn transpose_into<T: Copy>(
    k: &[T],
    n: usize,
    d: usize,
    count: usize,
    out: &mut [T],
    out_stride: usize,
) {
    if count == 0 || d == 0 {
        return;
    }
    // every index below is within these bounds (checked once here, not per element)
    assert!(count <= n && k.len() >= d * n && out.len() > (count - 1) * out_stride + d - 1);
    let (mut t_done, mut j_done) = (0, 0);
    #[cfg(target_arch = "x86_64")]
    if std::mem::size_of::<T>() == 4 {
        (t_done, j_done) = (count / 4 * 4, d / 4 * 4);
        // SAFETY: the tiles lie within t < t_done <= count, j < j_done <= d (bounds above)
        unsafe {
            transpose_4x4_tiles(
                k.as_ptr() as *const u32,
                n,
                t_done,
                j_done,
                out.as_mut_ptr() as *mut u32,
                out_stride,
            )
        };
    }
    for t in 0..count {
        // what the tiles left: columns past j_done of their rows, and whole rows past t_done
        let from = if t < t_done { j_done } else { 0 };
        for j in from..d {
            // SAFETY: j * n + t < d * n <= k.len() and
            // t * out_stride + j <= (count - 1) * out_stride + d - 1 < out.len()
            unsafe { *out.get_unchecked_mut(t * out_stride + j) = *k.get_unchecked(j * n + t) };
        }
    }
}

/// The 4x4 tiles of `transpose_into` for t < rows, j < cols (both multiples of 4).
///
/// # Safety
/// `k` holds `cols * n` elements from its start and `out` holds
/// `(rows - 1) * out_stride + cols` (callers check more than that).
#[cfg(target_arch = "x86_64")]
#[inline]
unsafe fn transpose_4x4_tiles(
    k: *const u32,
    n: usize,
    rows: usize,
    cols: usize,
    out: *mut u32,
    out_stride: usize,
) {
    use core::arch::x86_64::*;
    for t0 in (0..rows).step_by(4) {
        for j0 in (0..cols).step_by(4) {
            let load = |j: usize| _mm_loadu_si128(k.add((j0 + j) * n + t0) as *const __m128i);
            let (r0, r1, r2, r3) = (load(0), load(1), load(2), load(3));
            let (a, b) = (_mm_unpacklo_epi32(r0, r1), _mm_unpackhi_epi32(r0, r1));
            let (c, e) = (_mm_unpacklo_epi32(r2, r3), _mm_unpackhi_epi32(r2, r3));
            let store = |t: usize, v: __m128i| {
                _mm_storeu_si128(out.add((t0 + t) * out_stride + j0) as *mut __m128i, v)
            };
            store(0, _mm_unpacklo_epi64(a, c));
            store(1, _mm_unpackhi_epi64(a, c));
            store(2, _mm_unpacklo_epi64(b, e));
            store(3, _mm_unpackhi_epi64(b, e));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The definition: element by element, as the module's first paragraph states it.
    fn reference(l: &CpuPaged, src: &[u32], blocks: &[u64], tokens: usize) -> Vec<u32> {
        let (h, n, d) = (l.heads, l.block_size, l.head_dim);
        let mut out = vec![0; 2 * tokens * h * d];
        for tok in 0..tokens {
            let b = blocks[tok / n] as usize;
            let t = tok % n;
            for head in 0..h {
                for j in 0..d {
                    let base = b * l.block_stride + head * n * 2 * d;
                    out[(tok * h + head) * d + j] = src[base + j * n + t];
                    out[tokens * h * d + (tok * h + head) * d + j] = src[base + n * d + t * d + j];
                }
            }
        }
        out
    }

    proptest::proptest! {
        #[test]
        fn matches_the_definition(
            heads in 1usize..4,
            n in proptest::sample::select(vec![1usize, 3, 8, 16, 32]),
            d in proptest::sample::select(vec![1usize, 5, 8, 64]),
            pad in 0usize..3,
            num_blocks in 1usize..7,
            picks in proptest::collection::vec(0usize..7, 1..5),
            short in 0usize..32,
        ) {
            let l = CpuPaged { heads, block_size: n, head_dim: d, block_stride: heads * n * 2 * d + pad };
            let src: Vec<u32> = (0..num_blocks * l.block_stride).map(|x| x as u32).collect();
            let blocks: Vec<u64> = picks.iter().map(|&p| (p % num_blocks) as u64).collect();
            let tokens = blocks.len() * n - short % n;
            let mut dst = vec![u32::MAX; 2 * tokens * heads * d];
            copy_out(&l, &src, &blocks, tokens, &mut dst).unwrap();
            let want = reference(&l, &src, &blocks, tokens);
            proptest::prop_assert_eq!(&dst, &want);
            // 2-byte elements (bfloat16, float16) take the element-by-element path
            let src16: Vec<u16> = src.iter().map(|&x| x as u16).collect();
            let mut dst16 = vec![u16::MAX; dst.len()];
            copy_out(&l, &src16, &blocks, tokens, &mut dst16).unwrap();
            let want16: Vec<u16> = want.iter().map(|&x| x as u16).collect();
            proptest::prop_assert_eq!(dst16, want16);
        }
    }

    #[test]
    fn refuses_what_does_not_fit() {
        let l = CpuPaged {
            heads: 1,
            block_size: 4,
            head_dim: 2,
            block_stride: 16,
        };
        let src = vec![0u16; 64]; // 4 blocks
        let mut dst = vec![0u16; 2 * 8 * 2];
        assert!(copy_out(&l, &src, &[0, 3], 8, &mut dst).is_ok());
        assert!(
            copy_out(&l, &src, &[0, 4], 8, &mut dst).is_err(),
            "block past the end"
        );
        assert!(
            copy_out(&l, &src, &[0, u64::MAX], 8, &mut dst).is_err(),
            "overflowing block"
        );
        assert!(
            copy_out(&l, &src, &[0, 1], 9, &mut dst).is_err(),
            "more tokens than blocks"
        );
        assert!(
            copy_out(&l, &src, &[0, 1, 2], 8, &mut dst).is_err(),
            "an empty last block"
        );
        assert!(
            copy_out(&l, &src, &[0, 1], 7, &mut dst).is_err(),
            "destination size"
        );
        let bad = CpuPaged {
            block_stride: 15,
            ..l
        };
        assert!(
            copy_out(&bad, &src, &[0], 4, &mut dst[..16]).is_err(),
            "stride under a block"
        );
    }
}
