//! `lmcache_chunk_hashes` and `python_str_hash`: CPython's builtin hashes (rust/pyhash.rs) for
//! Python callers, as signed ints exactly as `hash()` gives them.

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use crate::error::Error;
use crate::py::convert::{i64_arg, int_arg, no_kwargs, str_arg, IntsArg};
use crate::py::index::chunk_size_arg;
use crate::pyhash::{self, SipRounds};

/// LMCache's chunk keys of `tokens`: `hash((prev, tuple(chunk), ()))` chained from `none_hash`.
#[pyfunction]
#[pyo3(
    signature = (tokens, chunk_size=None, none_hash=None, **kwargs),
    text_signature = "(tokens, chunk_size=256, none_hash=0)"
)]
pub fn lmcache_chunk_hashes<'py>(
    py: Python<'py>,
    tokens: &Bound<'py, PyAny>,
    chunk_size: Option<&Bound<'py, PyAny>>,
    none_hash: Option<&Bound<'py, PyAny>>,
    kwargs: Option<&Bound<'py, PyDict>>,
) -> PyResult<Bound<'py, PyList>> {
    no_kwargs("lmcache_chunk_hashes", kwargs)?;
    let cs = chunk_size.map(chunk_size_arg).transpose()?.unwrap_or(256);
    let none_hash = none_hash
        .map(|n| i64_arg(n, "none_hash"))
        .transpose()?
        .unwrap_or(0);
    let tokens = IntsArg::<u32>::extract(tokens, "tokens")?;
    let keys = py
        .detach(|| {
            tokens
                .view()
                .map(|t| pyhash::lmcache_chunk_hashes(&t, cs, none_hash))
        })
        .map_err(PyErr::from)?;
    PyList::new(py, keys)
}

/// `hash(text)` of a CPython started with `PYTHONHASHSEED=hash_seed`.
#[pyfunction]
#[pyo3(
    signature = (text, hash_seed, siphash=None, **kwargs),
    text_signature = "(text, hash_seed, siphash='siphash13')"
)]
pub fn python_str_hash(
    text: &Bound<'_, PyAny>,
    hash_seed: &Bound<'_, PyAny>,
    siphash: Option<&Bound<'_, PyAny>>,
    kwargs: Option<&Bound<'_, PyDict>>,
) -> PyResult<i64> {
    no_kwargs("python_str_hash", kwargs)?;
    let text = str_arg(text, "text")?;
    let seed = int_arg(hash_seed, "hash_seed", u32::MAX as u64)? as u32;
    let rounds = match siphash
        .map(|s| str_arg(s, "siphash"))
        .transpose()?
        .as_deref()
    {
        None | Some("siphash13") => SipRounds::Sip13,
        Some("siphash24") => SipRounds::Sip24,
        Some(other) => {
            return Err(Error::arg(format!(
            "siphash must be \"siphash13\" (CPython 3.11+) or \"siphash24\" (3.10), not {other:?}"
        ))
            .into())
        }
    };
    Ok(pyhash::hash_str(&text, seed, rounds))
}
