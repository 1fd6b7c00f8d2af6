//! `read_lmcache_push`: one read of LMCache's pull socket, its common-shape frames grouped in
//! Rust (see lmcache_push.rs) into what the controller's seq checks and ``Index.apply_batch``
//! need, without a Python object per operation.

use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyTuple};

use crate::lmcache_push::{self, Holder, OpKind, Segment};

/// Keys as native 64-bit words, as ``Index.apply_batch`` reads a bytes object.
fn packed<'py>(py: Python<'py>, keys: &[u64]) -> PyResult<Bound<'py, PyBytes>> {
    PyBytes::new_with(py, keys.len() * 8, |buf| {
        for (out, k) in buf.chunks_exact_mut(8).zip(keys) {
            out.copy_from_slice(&k.to_ne_bytes());
        }
        Ok(())
    })
}

fn holder<'py>(py: Python<'py>, h: &Holder<'_>) -> PyResult<Bound<'py, PyTuple>> {
    let runs = h
        .runs
        .iter()
        .map(|r| {
            let kind = match r.kind {
                OpKind::Admit => intern!(py, "admit"),
                OpKind::Evict => intern!(py, "evict"),
            };
            (kind, packed(py, &r.keys)?).into_pyobject(py)
        })
        .collect::<PyResult<Vec<_>>>()?;
    (
        h.instance_id,
        h.worker_id,
        h.location,
        h.frames,
        h.first_seq,
        h.last_seq,
        h.gaps.clone(),
        runs,
    )
        .into_pyobject(py)
}

fn segment<'py>(py: Python<'py>, s: &Segment<'_>) -> PyResult<Bound<'py, PyTuple>> {
    let holders = s
        .holders
        .iter()
        .map(|h| holder(py, h))
        .collect::<PyResult<Vec<_>>>()?;
    (s.start, s.end, holders).into_pyobject(py)
}

/// The frames of one read of the pull socket that have the common shape (a
/// ``BatchedKVOperationMsg`` of admits and evicts, known fields only), as segments of
/// consecutive frames: ``[(start, end, holders)]``, each holder ``(instance_id, worker_id,
/// location, frames, first_seq, last_seq, gaps, runs)`` in first-seen order, ``gaps`` the
/// sequence jumps between its messages ``[(expected, got)]``, ``runs`` its operations as
/// ``[("admit" | "evict", keys as native 64-bit words)]`` in order. Frames outside every
/// segment (other messages, other shapes, malformed bytes, objects that are not bytes) are
/// left to the caller.
#[pyfunction]
pub fn read_lmcache_push<'py>(
    py: Python<'py>,
    frames: &Bound<'py, PyList>,
) -> PyResult<Bound<'py, PyList>> {
    let items: Vec<Bound<'py, PyAny>> = frames.iter().collect();
    let data: Vec<&[u8]> = items
        .iter()
        .map(|f| f.cast::<PyBytes>().map(|b| b.as_bytes()).unwrap_or(&[]))
        .collect();
    let size: usize = data.iter().map(|d| d.len()).sum();
    // releasing the GIL costs more than reading a usual (tens of kB) read
    let segments = if size < 1 << 18 {
        lmcache_push::read(&data)
    } else {
        py.detach(|| lmcache_push::read(&data))
    };
    let out = segments
        .iter()
        .map(|s| segment(py, s))
        .collect::<PyResult<Vec<_>>>()?;
    PyList::new(py, out)
}
