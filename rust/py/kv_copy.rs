//! `copy_cpu_blocks`: a layer's KV blocks between vLLM's CPU paged cache and the store's
//! token-major layout (rust/kv_copy.rs), between two buffers (numpy views of torch tensors),
//! without the GIL.

use pyo3::buffer::PyUntypedBuffer;
use pyo3::prelude::*;

use crate::error::Error;
use crate::kv_copy::{self, CpuPaged, Element};
use crate::py::convert::{bool_arg, int_arg, IntsArg};

/// A buffer's address and size in items: C-contiguous, of 2- or 4-byte items, aligned to its
/// item size (slices of words must be); `writable` ones are refused if read-only.
fn raw(buf: &PyUntypedBuffer, name: &str, writable: bool) -> Result<(usize, usize), Error> {
    let size = buf.item_size();
    if !matches!(size, 2 | 4) {
        return Err(Error::arg(format!(
            "{name} must have items of 2 or 4 bytes, got {size}"
        )));
    }
    if !buf.is_c_contiguous() {
        return Err(Error::arg(format!("{name} must be C-contiguous")));
    }
    if writable && buf.readonly() {
        return Err(Error::arg(format!("{name} must be writable")));
    }
    let at = buf.buf_ptr() as usize;
    if !at.is_multiple_of(size) {
        return Err(Error::arg(format!(
            "{name} must be aligned to its {size}-byte items"
        )));
    }
    Ok((at, buf.item_count()))
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
    if kv_buf.item_size() != size {
        return Err(Error::arg(format!(
            "cache and kv must have one item size, got {size} and {}",
            kv_buf.item_size()
        ))
        .into());
    }
    // owned: a read-only buffer of block ids is read in place, and could share memory with
    // the buffer written
    let blocks: Vec<u64> = blocks.view()?.into_owned();
    let (cache_end, kv_end) = (cache_at + cache_items * size, kv_at + kv_items * size);
    if cache_at < kv_end && kv_at < cache_end {
        return Err(Error::arg("cache and kv overlap").into());
    }
    py.detach(|| {
        // SAFETY: both buffers are exported (held by cache_buf/kv_buf until the end of this
        // function), C-contiguous, aligned, of the checked item counts and size, and do not
        // overlap; the one written is writable. Like torch's own kernels, this relies on no
        // other thread freeing or resizing the memory behind them meanwhile (the exports keep
        // numpy's arrays alive, not a torch tensor's storage).
        let copy = CheckedCopy {
            layout,
            cache: (cache_at, cache_items),
            kv: (kv_at, kv_items),
            kv_first,
            to_cache,
        };
        unsafe {
            if size == 2 {
                copy.run::<u16>(&blocks, tokens)
            } else {
                copy.run::<u32>(&blocks, tokens)
            }
        }
    })?;
    drop((cache_buf, kv_buf));
    Ok(())
}

/// One checked copy: the buffers as (address, items).
struct CheckedCopy {
    layout: CpuPaged,
    cache: (usize, usize),
    kv: (usize, usize),
    kv_first: usize,
    to_cache: bool,
}

impl CheckedCopy {
    /// # Safety
    /// As at the call site: both buffers hold `T`s (aligned, of those item counts), apart from
    /// each other, the one written writable, and alive and unchanged in size meanwhile.
    unsafe fn run<T: Element>(&self, blocks: &[u64], tokens: usize) -> Result<(), Error> {
        let (cache, kv) = (self.cache, self.kv);
        if self.to_cache {
            kv_copy::copy_in(
                &self.layout,
                std::slice::from_raw_parts(kv.0 as *const T, kv.1),
                self.kv_first,
                blocks,
                tokens,
                std::slice::from_raw_parts_mut(cache.0 as *mut T, cache.1),
            )
        } else {
            kv_copy::copy_out(
                &self.layout,
                std::slice::from_raw_parts(cache.0 as *const T, cache.1),
                blocks,
                tokens,
                std::slice::from_raw_parts_mut(kv.0 as *mut T, kv.1),
            )
        }
    }
}
