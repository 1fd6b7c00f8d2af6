//! `copy_cpu_blocks`: a layer's KV blocks between vLLM's CPU paged cache and the store's
//! token-major layout (rust/kv_copy.rs), between two buffers (numpy views of torch tensors),
//! without the GIL.

use pyo3::buffer::PyUntypedBuffer;
use pyo3::prelude::*;

use crate::error::Error;
use crate::kv_copy::{self, CpuPaged};
use crate::py::convert::{bool_arg, int_arg, IntsArg};

/// A C-contiguous buffer's address and size in items; `writable` ones are refused if read-only.
fn raw(buf: &PyUntypedBuffer, name: &str, writable: bool) -> Result<(usize, usize), Error> {
    if !buf.is_c_contiguous() {
        return Err(Error::arg(format!("{name} must be C-contiguous")));
    }
    if writable && buf.readonly() {
        return Err(Error::arg(format!("{name} must be writable")));
    }
    Ok((buf.buf_ptr() as usize, buf.item_count()))
}

/// Copy the first `tokens` tokens of `blocks` between `cache`, one layer of vLLM's CPU paged
/// cache (`[num_blocks, heads, block_size, 2 * head_dim]` with `block_stride` elements from one
/// block to the next), and `kv`, `[2, tokens, heads, head_dim]`: out of the cache into `kv`,
/// or with `to_cache` from `kv` into the cache, `kv` then `[2, T, heads, head_dim]` for any T
/// that holds tokens `kv_first..kv_first + tokens`. Both buffers C-contiguous, of one item
/// size (2 or 4 bytes; the bytes are moved, never converted) and not overlapping.
#[pyfunction]
#[pyo3(
    signature = (cache, kv, blocks, tokens, heads, block_size, head_dim, block_stride, to_cache=None, kv_first=None),
    text_signature = "(cache, kv, blocks, tokens, heads, block_size, head_dim, block_stride, to_cache=False, kv_first=0)"
)]
#[allow(clippy::too_many_arguments)]
pub fn copy_cpu_blocks(
    py: Python<'_>,
    cache: &Bound<'_, PyAny>,
    kv: &Bound<'_, PyAny>,
    blocks: &Bound<'_, PyAny>,
    tokens: &Bound<'_, PyAny>,
    heads: &Bound<'_, PyAny>,
    block_size: &Bound<'_, PyAny>,
    head_dim: &Bound<'_, PyAny>,
    block_stride: &Bound<'_, PyAny>,
    to_cache: Option<&Bound<'_, PyAny>>,
    kv_first: Option<&Bound<'_, PyAny>>,
) -> PyResult<()> {
    let layout = CpuPaged {
        heads: int_arg(heads, "heads", u32::MAX as u64)? as usize,
        block_size: int_arg(block_size, "block_size", u32::MAX as u64)? as usize,
        head_dim: int_arg(head_dim, "head_dim", u32::MAX as u64)? as usize,
        block_stride: int_arg(block_stride, "block_stride", u64::MAX >> 8)? as usize,
    };
    let tokens = int_arg(tokens, "tokens", u32::MAX as u64)? as usize;
    let to_cache = to_cache
        .map(|b| bool_arg(b, "to_cache"))
        .transpose()?
        .unwrap_or(false);
    let kv_first = kv_first
        .map(|k| int_arg(k, "kv_first", u32::MAX as u64))
        .transpose()?
        .unwrap_or(0) as usize;
    if kv_first != 0 && !to_cache {
        return Err(Error::arg("kv_first is for copies into the cache (to_cache=True)").into());
    }
    let blocks = IntsArg::<u64>::extract(blocks, "blocks")?;
    let cache_buf = PyUntypedBuffer::get(cache)?;
    let kv_buf = PyUntypedBuffer::get(kv)?;
    let (cache_at, cache_items) = raw(&cache_buf, "cache", to_cache)?;
    let (kv_at, kv_items) = raw(&kv_buf, "kv", !to_cache)?;
    let size = cache_buf.item_size();
    if kv_buf.item_size() != size || !matches!(size, 2 | 4) {
        return Err(Error::arg(format!(
            "cache and kv must have one item size of 2 or 4 bytes, got {size} and {}",
            kv_buf.item_size()
        ))
        .into());
    }
    let (cache_end, kv_end) = (cache_at + cache_items * size, kv_at + kv_items * size);
    if cache_at < kv_end && kv_at < cache_end {
        return Err(Error::arg("cache and kv overlap").into());
    }
    py.detach(|| {
        let blocks = blocks.view()?;
        // SAFETY: both buffers are exported (held by cache_buf/kv_buf until the end of this
        // function), C-contiguous, of the checked item counts and size, and do not overlap;
        // the one written is writable. As with torch's own kernels, a caller that changes them
        // from another thread meanwhile gets unspecified values, never an access outside them.
        unsafe {
            match (size, to_cache) {
                (2, false) => kv_copy::copy_out(
                    &layout,
                    std::slice::from_raw_parts(cache_at as *const u16, cache_items),
                    &blocks,
                    tokens,
                    std::slice::from_raw_parts_mut(kv_at as *mut u16, kv_items),
                ),
                (2, true) => kv_copy::copy_in(
                    &layout,
                    std::slice::from_raw_parts(kv_at as *const u16, kv_items),
                    kv_first,
                    &blocks,
                    tokens,
                    std::slice::from_raw_parts_mut(cache_at as *mut u16, cache_items),
                ),
                (_, false) => kv_copy::copy_out(
                    &layout,
                    std::slice::from_raw_parts(cache_at as *const u32, cache_items),
                    &blocks,
                    tokens,
                    std::slice::from_raw_parts_mut(kv_at as *mut u32, kv_items),
                ),
                (_, true) => kv_copy::copy_in(
                    &layout,
                    std::slice::from_raw_parts(kv_at as *const u32, kv_items),
                    kv_first,
                    &blocks,
                    tokens,
                    std::slice::from_raw_parts_mut(cache_at as *mut u32, cache_items),
                ),
            }
        }
    })?;
    drop((cache_buf, kv_buf));
    Ok(())
}
