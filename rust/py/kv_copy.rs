//! `copy_cpu_blocks`: a layer's KV blocks out of vLLM's CPU paged cache (rust/kv_copy.rs),
//! between two buffers (numpy views of torch tensors), without the GIL.

use pyo3::buffer::PyUntypedBuffer;
use pyo3::prelude::*;

use crate::error::Error;
use crate::kv_copy::{self, CpuPaged};
use crate::py::convert::{int_arg, IntsArg};

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

/// Copy the first `tokens` tokens of `blocks` out of `src`, one layer of vLLM's CPU paged
/// cache (`[num_blocks, heads, block_size, 2 * head_dim]` with `block_stride` elements from one
/// block to the next), into `dst`, `[2, tokens, heads, head_dim]`. Both buffers C-contiguous,
/// of one item size (2 or 4 bytes; the bytes are moved, never converted) and not overlapping.
#[pyfunction]
#[pyo3(signature = (src, dst, blocks, tokens, heads, block_size, head_dim, block_stride))]
#[allow(clippy::too_many_arguments)]
pub fn copy_cpu_blocks(
    py: Python<'_>,
    src: &Bound<'_, PyAny>,
    dst: &Bound<'_, PyAny>,
    blocks: &Bound<'_, PyAny>,
    tokens: &Bound<'_, PyAny>,
    heads: &Bound<'_, PyAny>,
    block_size: &Bound<'_, PyAny>,
    head_dim: &Bound<'_, PyAny>,
    block_stride: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let layout = CpuPaged {
        heads: int_arg(heads, "heads", u32::MAX as u64)? as usize,
        block_size: int_arg(block_size, "block_size", u32::MAX as u64)? as usize,
        head_dim: int_arg(head_dim, "head_dim", u32::MAX as u64)? as usize,
        block_stride: int_arg(block_stride, "block_stride", u64::MAX >> 8)? as usize,
    };
    let tokens = int_arg(tokens, "tokens", u32::MAX as u64)? as usize;
    let blocks = IntsArg::<u64>::extract(blocks, "blocks")?;
    let src_buf = PyUntypedBuffer::get(src)?;
    let dst_buf = PyUntypedBuffer::get(dst)?;
    let (src_at, src_items) = raw(&src_buf, "src", false)?;
    let (dst_at, dst_items) = raw(&dst_buf, "dst", true)?;
    let size = src_buf.item_size();
    if dst_buf.item_size() != size || !matches!(size, 2 | 4) {
        return Err(Error::arg(format!(
            "src and dst must have one item size of 2 or 4 bytes, got {size} and {}",
            dst_buf.item_size()
        ))
        .into());
    }
    let (src_end, dst_end) = (src_at + src_items * size, dst_at + dst_items * size);
    if src_at < dst_end && dst_at < src_end {
        return Err(Error::arg("src and dst overlap").into());
    }
    py.detach(|| {
        let blocks = blocks.view()?;
        // SAFETY: both buffers are exported (held by src_buf/dst_buf until the end of this
        // function), C-contiguous, of the checked item counts and size, and do not overlap;
        // dst is writable. As with torch's own kernels, a caller that changes them from another
        // thread meanwhile gets unspecified values, never an access outside them.
        unsafe {
            if size == 2 {
                let s = std::slice::from_raw_parts(src_at as *const u16, src_items);
                let d = std::slice::from_raw_parts_mut(dst_at as *mut u16, dst_items);
                kv_copy::copy_out(&layout, s, &blocks, tokens, d)
            } else {
                let s = std::slice::from_raw_parts(src_at as *const u32, src_items);
                let d = std::slice::from_raw_parts_mut(dst_at as *mut u32, dst_items);
                kv_copy::copy_out(&layout, s, &blocks, tokens, d)
            }
        }
    })?;
    drop((src_buf, dst_buf));
    Ok(())
}
