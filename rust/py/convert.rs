//! Python values -> core values: token ids, chunk keys, ids and names.
//!
//! Integer sequences arrive as lists/tuples, objects exposing the buffer protocol (bytes,
//! bytearray, memoryview, array.array, numpy arrays) or objects with `__array__` (CPU torch
//! tensors; torch is never imported here). A C-contiguous buffer whose items already have the
//! target width is read in place, without a copy; other widths are range-checked and converted.
//! One-byte buffers (bytes, bytearray, memoryview of bytes) are raw little-endian words.
//! Conversion from a buffer happens in `view`, which needs no GIL.

use std::borrow::Cow;
use std::path::PathBuf;
use std::sync::Arc;

use pyo3::buffer::{ElementType, PyUntypedBuffer};
use pyo3::prelude::*;
use pyo3::types::{PyInt, PyList, PySequence, PyString, PyTuple};

use crate::error::{Error, Result};

/// The width of the integers an argument is converted to.
pub trait Word: Copy + Send + Sync + 'static {
    const BYTES: usize;
    const MAX: u64;
    fn from_u64(v: u64) -> Self;
    fn from_le(b: &[u8]) -> Self;
}

impl Word for u32 {
    const BYTES: usize = 4;
    const MAX: u64 = u32::MAX as u64;
    #[inline]
    fn from_u64(v: u64) -> Self {
        v as u32
    }
    #[inline]
    fn from_le(b: &[u8]) -> Self {
        u32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }
}

impl Word for u64 {
    const BYTES: usize = 8;
    const MAX: u64 = u64::MAX;
    #[inline]
    fn from_u64(v: u64) -> Self {
        v
    }
    #[inline]
    fn from_le(b: &[u8]) -> Self {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[..8]);
        u64::from_le_bytes(a)
    }
}

#[derive(Clone, Copy, Debug)]
enum Elem {
    /// One-byte items: raw little-endian words.
    Raw,
    Unsigned(usize),
    Signed(usize),
}

enum Data {
    /// A C-contiguous buffer, read in place.
    Buffer(PyUntypedBuffer),
    /// A strided buffer, gathered into contiguous bytes.
    Gathered(Vec<u8>),
}

enum Src<T> {
    Owned(Vec<T>),
    Buffer {
        data: Data,
        elem: Elem,
        items: usize,
    },
}

/// A converted integer-sequence argument (`T` = u32 for tokens, u64 for chunk keys).
pub struct IntsArg<T: Word> {
    name: &'static str,
    src: Src<T>,
}

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".into())
}

fn out_of_range<T: Word>(name: &str, i: usize, v: impl std::fmt::Display) -> Error {
    Error::arg(format!("{name}[{i}] = {v} is out of range 0..={}", T::MAX))
}

impl<T: Word> IntsArg<T> {
    pub fn extract(obj: &Bound<'_, PyAny>, name: &'static str) -> Result<Self> {
        if let Ok(list) = obj.cast::<PyList>() {
            return Self::from_iter(name, list.len(), list.iter());
        }
        if let Ok(tuple) = obj.cast::<PyTuple>() {
            return Self::from_iter(name, tuple.len(), tuple.iter());
        }
        if obj.is_instance_of::<PyString>() {
            return Err(Error::ty(format!(
                "{name} must be a sequence of int, not str"
            )));
        }
        if let Ok(buf) = PyUntypedBuffer::get(obj) {
            return Self::from_buffer(name, buf);
        }
        if obj.hasattr("__array__").unwrap_or(false) {
            let arr = obj.call_method0("__array__").map_err(|e| {
                Error::ty(format!(
                    "{name}: cannot read {} as an array: {e}",
                    type_name(obj)
                ))
            })?;
            return match PyUntypedBuffer::get(&arr) {
                Ok(buf) => Self::from_buffer(name, buf),
                Err(_) => Err(Error::ty(format!(
                    "{name}: {}.__array__() gave no buffer",
                    type_name(obj)
                ))),
            };
        }
        // any other ordered sequence (range, collections.deque, ...); sets, dicts and
        // one-shot iterators are refused rather than guessed at
        match obj.cast::<PySequence>() {
            Ok(seq) => {
                let items: Vec<Bound<'_, PyAny>> = seq
                    .try_iter()
                    .and_then(|it| it.collect::<PyResult<_>>())
                    .map_err(|e| Error::ty(format!("{name}: iterating failed: {e}")))?;
                Self::from_iter(name, items.len(), items.into_iter())
            }
            Err(_) => Err(Error::ty(format!(
                "{name} must be a list of int, a buffer of integers (bytes, array.array, numpy) \
                 or a CPU tensor, not {}",
                type_name(obj)
            ))),
        }
    }

    fn from_iter<'py>(
        name: &'static str,
        len: usize,
        items: impl Iterator<Item = Bound<'py, PyAny>>,
    ) -> Result<Self> {
        let mut out = Vec::with_capacity(len);
        for (i, item) in items.enumerate() {
            match item.extract::<u64>() {
                Ok(v) if v <= T::MAX => out.push(T::from_u64(v)),
                Ok(v) => return Err(out_of_range::<T>(name, i, v)),
                Err(_) if item.is_instance_of::<PyInt>() => {
                    let repr = item.str().map(|s| s.to_string()).unwrap_or_default();
                    return Err(out_of_range::<T>(name, i, repr));
                }
                Err(_) => {
                    return Err(Error::ty(format!(
                        "{name}[{i}] must be an int, not {}",
                        type_name(&item)
                    )))
                }
            }
        }
        Ok(IntsArg {
            name,
            src: Src::Owned(out),
        })
    }

    fn from_buffer(name: &'static str, buf: PyUntypedBuffer) -> Result<Self> {
        let format = buf.format().to_bytes().to_vec();
        let fmt_str = String::from_utf8_lossy(&format).into_owned();
        if matches!(format.first(), Some(b'>' | b'!')) && cfg!(target_endian = "little") {
            return Err(Error::ty(format!(
                "{name}: big-endian buffers (format {fmt_str:?}) are not supported"
            )));
        }
        let elem = match ElementType::from_format(buf.format()) {
            ElementType::UnsignedInteger { bytes: 1 } | ElementType::SignedInteger { bytes: 1 } => {
                Elem::Raw
            }
            ElementType::UnsignedInteger { bytes } if matches!(bytes, 2 | 4 | 8) => {
                Elem::Unsigned(bytes)
            }
            ElementType::SignedInteger { bytes } if matches!(bytes, 2 | 4 | 8) => {
                Elem::Signed(bytes)
            }
            _ => {
                return Err(Error::ty(format!(
                    "{name} must hold integers, got a buffer of format {fmt_str:?}"
                )))
            }
        };
        if buf.dimensions() != 1 {
            return Err(Error::arg(format!(
                "{name} must be one-dimensional, got shape {:?}",
                buf.shape()
            )));
        }
        if buf.suboffsets().is_some_and(|s| s.iter().any(|o| *o >= 0)) {
            return Err(Error::ty(format!(
                "{name}: indirect buffers are not supported"
            )));
        }
        let items = buf.item_count();
        let size = buf.item_size();
        let data = if buf.is_c_contiguous() {
            Data::Buffer(buf)
        } else {
            // a strided view (e.g. arr[::2]): gather the items (GIL held, buffer exported)
            let stride = buf.strides()[0];
            let base = buf.buf_ptr() as *const u8;
            let mut v = Vec::with_capacity(items * size);
            for i in 0..items as isize {
                // SAFETY: the exporter guarantees items at base + i * stride for i < shape[0]
                let p = unsafe { base.offset(i * stride) };
                v.extend_from_slice(unsafe { std::slice::from_raw_parts(p, size) });
            }
            Data::Gathered(v)
        };
        Ok(IntsArg {
            name,
            src: Src::Buffer { data, elem, items },
        })
    }

    /// The values, borrowed from the buffer when it already holds `T`s.
    pub fn view(&self) -> Result<Cow<'_, [T]>> {
        let (data, elem, items) = match &self.src {
            Src::Owned(v) => return Ok(Cow::Borrowed(v)),
            Src::Buffer { data, elem, items } => (data, *elem, *items),
        };
        let bytes: &[u8] = match data {
            Data::Gathered(v) => v,
            Data::Buffer(buf) => {
                let ptr = buf.buf_ptr() as *const u8;
                if ptr.is_null() || buf.len_bytes() == 0 {
                    &[]
                } else {
                    // SAFETY: a C-contiguous exported buffer of len_bytes bytes, kept alive (and
                    // not resizable) by the export that `buf` holds
                    unsafe { std::slice::from_raw_parts(ptr, buf.len_bytes()) }
                }
            }
        };
        let name = self.name;
        match elem {
            Elem::Raw => {
                if !bytes.len().is_multiple_of(T::BYTES) {
                    return Err(Error::arg(format!(
                        "{name}: {} bytes is not a whole number of {}-byte little-endian words",
                        bytes.len(),
                        T::BYTES
                    )));
                }
                if cfg!(target_endian = "little") {
                    if let Some(words) = borrow_as_words(bytes) {
                        return Ok(Cow::Borrowed(words));
                    }
                }
                Ok(Cow::Owned(
                    bytes.chunks_exact(T::BYTES).map(T::from_le).collect(),
                ))
            }
            Elem::Unsigned(size) if size == T::BYTES => {
                if let Some(words) = borrow_as_words(bytes) {
                    return Ok(Cow::Borrowed(words));
                }
                Ok(Cow::Owned(
                    bytes
                        .chunks_exact(size)
                        .map(|c| T::from_u64(ne_unsigned(c)))
                        .collect(),
                ))
            }
            Elem::Unsigned(size) => {
                let mut out = Vec::with_capacity(items);
                for (i, c) in bytes.chunks_exact(size).enumerate() {
                    let v = ne_unsigned(c);
                    if v > T::MAX {
                        return Err(out_of_range::<T>(name, i, v));
                    }
                    out.push(T::from_u64(v));
                }
                Ok(Cow::Owned(out))
            }
            Elem::Signed(size) => {
                let mut out = Vec::with_capacity(items);
                for (i, c) in bytes.chunks_exact(size).enumerate() {
                    let v = ne_signed(c);
                    if v < 0 || v as u64 > T::MAX {
                        return Err(out_of_range::<T>(name, i, v));
                    }
                    out.push(T::from_u64(v as u64));
                }
                Ok(Cow::Owned(out))
            }
        }
    }
}

/// `bytes` as words when aligned (`T` is a plain integer: every bit pattern is valid).
fn borrow_as_words<T: Word>(bytes: &[u8]) -> Option<&[T]> {
    // SAFETY: u32/u64 have no invalid bit patterns; align_to only yields aligned words
    let (pre, mid, post) = unsafe { bytes.align_to::<T>() };
    (pre.is_empty() && post.is_empty()).then_some(mid)
}

#[inline]
fn ne_unsigned(c: &[u8]) -> u64 {
    match c.len() {
        2 => u16::from_ne_bytes([c[0], c[1]]) as u64,
        4 => u32::from_ne_bytes([c[0], c[1], c[2], c[3]]) as u64,
        _ => u64::from_ne_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]),
    }
}

#[inline]
fn ne_signed(c: &[u8]) -> i64 {
    match c.len() {
        2 => i16::from_ne_bytes([c[0], c[1]]) as i64,
        4 => i32::from_ne_bytes([c[0], c[1], c[2], c[3]]) as i64,
        _ => i64::from_ne_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]),
    }
}

/// A non-negative int argument no larger than `max`.
pub fn int_arg(obj: &Bound<'_, PyAny>, name: &str, max: u64) -> Result<u64> {
    if !obj.is_instance_of::<PyInt>() {
        return Err(Error::ty(format!(
            "{name} must be an int, not {}",
            type_name(obj)
        )));
    }
    match obj.extract::<u64>() {
        Ok(v) if v <= max => Ok(v),
        _ => {
            let repr = obj.str().map(|s| s.to_string()).unwrap_or_default();
            Err(Error::arg(format!(
                "{name} = {repr} is out of range 0..={max}"
            )))
        }
    }
}

/// A str argument.
pub fn str_arg(obj: &Bound<'_, PyAny>, name: &str) -> Result<Arc<str>> {
    match obj.cast::<PyString>() {
        Ok(s) => s
            .to_str()
            .map(Arc::from)
            .map_err(|_| Error::arg(format!("{name} is not valid UTF-8"))),
        Err(_) => Err(Error::ty(format!(
            "{name} must be a str, not {}",
            type_name(obj)
        ))),
    }
}

/// A bool argument.
pub fn bool_arg(obj: &Bound<'_, PyAny>, name: &str) -> Result<bool> {
    obj.extract::<bool>()
        .map_err(|_| Error::ty(format!("{name} must be a bool, not {}", type_name(obj))))
}

/// A str or os.PathLike argument.
pub fn path_arg(obj: &Bound<'_, PyAny>, name: &str) -> Result<PathBuf> {
    obj.extract::<PathBuf>().map_err(|_| {
        Error::ty(format!(
            "{name} must be a str or os.PathLike, not {}",
            type_name(obj)
        ))
    })
}

/// Refuse unexpected keyword arguments with InvalidTypeError naming them.
pub fn no_kwargs(func: &str, kwargs: Option<&Bound<'_, pyo3::types::PyDict>>) -> Result<()> {
    if let Some(kw) = kwargs {
        if let Some((k, _)) = kw.iter().next() {
            return Err(Error::ty(format!(
                "{func}() got an unexpected keyword argument {}",
                k.repr().map(|r| r.to_string()).unwrap_or_default()
            )));
        }
    }
    Ok(())
}
