//! Copying KV blocks between vLLM's CPU paged cache and the store's token-major layout.
//!
//! vLLM's CPU attention keeps a layer as `[num_blocks, H, N, 2D]`: per block and head, first K
//! transposed (`K[n][d]` at `d*N + n`), then V row-major (`V[n][d]` at `N*D + n*D + d`). The
//! store keeps a layer's tokens as `[2, T, H, D]`: K of every token, then V. Torch does this
//! reordering with one strided gather (or scatter) per block, element by element (1.5-2 GB/s
//! on the CPUs measured); here K is transposed in small tiles and V copied row by row, which
//! runs at about memory speed. Saves (`copy_out`) run on every prefill miss, loads (`copy_in`)
//! on every hit.

use crate::error::{Error, Result};

/// The element types copied: 2- and 4-byte words (bfloat16, float16, float32 moved as bits).
/// Sealed: the 4-byte path reads whole words through SIMD registers, which a type with
/// padding bytes must not be.
pub trait Element: Copy + sealed::Sealed {}
impl Element for u16 {}
impl Element for u32 {}

mod sealed {
    pub trait Sealed {}
    impl Sealed for u16 {}
    impl Sealed for u32 {}
}

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

/// Check the sizes for copying `tokens` tokens of `blocks` between a cache of `cache_len`
/// elements and tokens `kv_first..kv_first + tokens` of a `[2, kv_tokens, H, D]` tensor of
/// `kv_len` elements; returns a block's length.
fn check(
    layout: &CpuPaged,
    cache_len: usize,
    blocks: &[u64],
    tokens: usize,
    (kv_len, kv_tokens, kv_first): (usize, usize, usize),
) -> Result<usize> {
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
    // a block has at least one element per (head, token, dim) pair, so these fit in usize
    let row = heads * d;
    let span = blocks.len().checked_mul(n);
    if span.is_none_or(|span| tokens > span || tokens.saturating_add(n) <= span) {
        return Err(Error::arg(format!(
            "{tokens} tokens do not fill {} blocks of {n} (the last may be partial)",
            blocks.len()
        )));
    }
    let kv_size = kv_tokens.checked_mul(2 * row);
    if kv_size != Some(kv_len) || kv_first.saturating_add(tokens) > kv_tokens {
        return Err(Error::arg(format!(
            "the token-major side holds {kv_len} elements, not [2, {kv_tokens}, {heads}, {d}] \
             with tokens {kv_first}..{} in it",
            kv_first.saturating_add(tokens)
        )));
    }
    for &b in blocks {
        let end = usize::try_from(b)
            .ok()
            .and_then(|b| b.checked_mul(block_stride))
            .and_then(|start| start.checked_add(block_len));
        if end.is_none_or(|end| end > cache_len) {
            return Err(Error::arg(format!(
                "block {b} is outside the cache ({cache_len} elements, {block_stride} a block)"
            )));
        }
    }
    Ok(block_len)
}

/// Copy the first `tokens` tokens of `blocks` (a request's blocks in token order; the last may
/// be partly filled) from `cache`, one layer in vLLM's CPU layout, into `kv`,
/// `[2, tokens, H, D]`. Every size and block index is checked before anything is copied.
pub fn copy_out<T: Element>(
    layout: &CpuPaged,
    cache: &[T],
    blocks: &[u64],
    tokens: usize,
    kv: &mut [T],
) -> Result<()> {
    let block_len = check(layout, cache.len(), blocks, tokens, (kv.len(), tokens, 0))?;
    let CpuPaged {
        heads,
        block_size: n,
        head_dim: d,
        block_stride,
    } = *layout;
    let row = heads * d; // one token of K (or V) in kv
    let (kv_k, kv_v) = kv.split_at_mut(tokens * row);
    for (i, &b) in blocks.iter().enumerate() {
        let first = i * n; // the block's first token in kv
        let count = n.min(tokens - first);
        let block = &cache[b as usize * block_stride..][..block_len];
        for h in 0..heads {
            // K is [d][n] (token t's K is its column t), V is [n][d]
            let k = &block[h * n * 2 * d..][..n * d];
            let v = &block[h * n * 2 * d + n * d..][..n * d];
            transpose(k, n, count, d, &mut kv_k[first * row + h * d..], row);
            for t in 0..count {
                kv_v[(first + t) * row + h * d..][..d].copy_from_slice(&v[t * d..][..d]);
            }
        }
    }
    Ok(())
}

/// The inverse of `copy_out`, from tokens `kv_first..kv_first + tokens` of `kv`
/// (`[2, T, H, D]`, T of any size that holds them) into the first `tokens` tokens of `blocks`
/// in `cache`. The rest of a partly filled last block is left as it is.
pub fn copy_in<T: Element>(
    layout: &CpuPaged,
    kv: &[T],
    kv_first: usize,
    blocks: &[u64],
    tokens: usize,
    cache: &mut [T],
) -> Result<()> {
    let CpuPaged {
        heads,
        block_size: n,
        head_dim: d,
        block_stride,
    } = *layout;
    // (what overflows here is refused by `check`, which sees the true sizes)
    let kv_tokens = match heads.checked_mul(d).and_then(|r| r.checked_mul(2)) {
        Some(per_token) if per_token > 0 => kv.len() / per_token,
        _ => 0,
    };
    let block_len = check(
        layout,
        cache.len(),
        blocks,
        tokens,
        (kv.len(), kv_tokens, kv_first),
    )?;
    let row = heads * d;
    let (kv_k, kv_v) = kv.split_at(kv_tokens * row);
    for (i, &b) in blocks.iter().enumerate() {
        let first = kv_first + i * n; // the block's first token in kv
        let count = n.min(tokens - i * n);
        let block = &mut cache[b as usize * block_stride..][..block_len];
        for h in 0..heads {
            let (k, v) = block[h * n * 2 * d..][..2 * n * d].split_at_mut(n * d);
            // row j of the block's [d][n] K: dimension j of the block's tokens
            transpose(&kv_k[first * row + h * d..], row, d, count, k, n);
            for t in 0..count {
                v[t * d..][..d].copy_from_slice(&kv_v[(first + t) * row + h * d..][..d]);
            }
        }
    }
    Ok(())
}

/// `output[r * out_stride + c] = input[c * in_stride + r]` for r < rows, c < cols. 4-byte
/// elements go 4x4 at a time through SSE2 registers (four loads of 4 neighbours, four unpacks
/// of each kind, four stores); the edges, and 2-byte elements, one at a time.
#[inline]
fn transpose<T: Element>(
    input: &[T],
    in_stride: usize,
    rows: usize,
    cols: usize,
    output: &mut [T],
    out_stride: usize,
) {
    if rows == 0 || cols == 0 {
        return;
    }
    // every index below is within these bounds (checked once here, not per element)
    assert!(
        rows <= in_stride
            && input.len() >= (cols - 1) * in_stride + rows
            && cols <= out_stride
            && output.len() >= (rows - 1) * out_stride + cols
    );
    let (mut rows_done, mut cols_done) = (0, 0);
    #[cfg(target_arch = "x86_64")]
    if std::mem::size_of::<T>() == 4 {
        (rows_done, cols_done) = (rows / 4 * 4, cols / 4 * 4);
        // SAFETY: the tiles lie within r < rows_done <= rows, c < cols_done <= cols (above)
        unsafe {
            transpose_4x4_tiles(
                input.as_ptr() as *const u32,
                in_stride,
                rows_done,
                cols_done,
                output.as_mut_ptr() as *mut u32,
                out_stride,
            )
        };
    }
    for r in 0..rows {
        // what the tiles left: columns past cols_done of their rows, and rows past rows_done
        let from = if r < rows_done { cols_done } else { 0 };
        for c in from..cols {
            // SAFETY: c * in_stride + r <= (cols - 1) * in_stride + rows - 1 < input.len() and
            // r * out_stride + c <= (rows - 1) * out_stride + cols - 1 < output.len()
            unsafe {
                *output.get_unchecked_mut(r * out_stride + c) =
                    *input.get_unchecked(c * in_stride + r)
            };
        }
    }
}

/// The 4x4 tiles of `transpose` for r < rows, c < cols (both multiples of 4).
///
/// # Safety
/// `input` holds `(cols - 1) * in_stride + rows` elements and `output` holds
/// `(rows - 1) * out_stride + cols` (as `transpose` checks).
#[cfg(target_arch = "x86_64")]
#[inline]
unsafe fn transpose_4x4_tiles(
    input: *const u32,
    in_stride: usize,
    rows: usize,
    cols: usize,
    output: *mut u32,
    out_stride: usize,
) {
    use core::arch::x86_64::*;
    for r0 in (0..rows).step_by(4) {
        for c0 in (0..cols).step_by(4) {
            let load =
                |c: usize| _mm_loadu_si128(input.add((c0 + c) * in_stride + r0) as *const __m128i);
            let (x0, x1, x2, x3) = (load(0), load(1), load(2), load(3));
            let (a, b) = (_mm_unpacklo_epi32(x0, x1), _mm_unpackhi_epi32(x0, x1));
            let (c, e) = (_mm_unpacklo_epi32(x2, x3), _mm_unpackhi_epi32(x2, x3));
            let store = |r: usize, v: __m128i| {
                _mm_storeu_si128(output.add((r0 + r) * out_stride + c0) as *mut __m128i, v)
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
    use proptest::strategy::Strategy;

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

    /// Layouts with and without whole 4x4 tiles, blocks packed or a little apart.
    fn layouts() -> impl Strategy<Value = CpuPaged> {
        (
            1usize..4,
            proptest::sample::select(vec![1usize, 3, 8, 16, 32]),
            proptest::sample::select(vec![1usize, 5, 8, 64]),
            0usize..3,
        )
            .prop_map(|(heads, n, d, pad)| CpuPaged {
                heads,
                block_size: n,
                head_dim: d,
                block_stride: heads * n * 2 * d + pad,
            })
    }

    proptest::proptest! {
        #[test]
        fn matches_the_definition(
            l in layouts(),
            num_blocks in 1usize..7,
            picks in proptest::collection::vec(0usize..7, 1..5),
            short in 0usize..32,
        ) {
            let (heads, n, d) = (l.heads, l.block_size, l.head_dim);
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

    proptest::proptest! {
        #[test]
        fn copy_in_writes_exactly_the_tokens_copy_out_reads(
            l in layouts(),
            order in proptest::sample::subsequence((0..7u64).collect::<Vec<_>>(), 1..5).prop_shuffle(),
            short in 0usize..32,
        ) {
            let (heads, n, d) = (l.heads, l.block_size, l.head_dim);
            let tokens = order.len() * n - short % n;
            let kv: Vec<u32> = (0..2 * tokens * heads * d).map(|x| 1_000_000 + x as u32).collect();
            let before: Vec<u32> = (0..7 * l.block_stride).map(|x| x as u32).collect();
            let mut cache = before.clone();
            copy_in(&l, &kv, 0, &order, tokens, &mut cache).unwrap();
            // read back, the tokens are kv
            let mut back = vec![0u32; kv.len()];
            copy_out(&l, &cache, &order, tokens, &mut back).unwrap();
            proptest::prop_assert_eq!(&back, &kv);
            // and nothing else changed: write the old tokens back, get the old cache
            let mut old = vec![0u32; kv.len()];
            copy_out(&l, &before, &order, tokens, &mut old).unwrap();
            copy_in(&l, &old, 0, &order, tokens, &mut cache).unwrap();
            proptest::prop_assert_eq!(&cache, &before);
            // from tokens `skip..` of a longer kv: what copy_in of those tokens alone writes
            let skip = short % 3;
            let row = heads * d;
            let longer: Vec<u32> = (0..2 * (tokens + skip) * row).map(|x| 7 + x as u32).collect();
            let mut part = longer[skip * row..(skip + tokens) * row].to_vec();
            part.extend_from_slice(&longer[(tokens + skip + skip) * row..(2 * (tokens + skip)) * row]);
            let (mut c1, mut c2) = (before.clone(), before.clone());
            copy_in(&l, &longer, skip, &order, tokens, &mut c1).unwrap();
            copy_in(&l, &part, 0, &order, tokens, &mut c2).unwrap();
            proptest::prop_assert_eq!(c1, c2);
            // 2-byte elements the same way
            let kv16: Vec<u16> = kv.iter().map(|&x| x as u16).collect();
            let before16: Vec<u16> = before.iter().map(|&x| x as u16).collect();
            let mut cache16 = before16.clone();
            copy_in(&l, &kv16, 0, &order, tokens, &mut cache16).unwrap();
            let mut back16 = vec![0u16; kv16.len()];
            copy_out(&l, &cache16, &order, tokens, &mut back16).unwrap();
            proptest::prop_assert_eq!(back16, kv16);
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
