//! Python values -> core values: token ids, chunk keys, ids and names.
//!
//! Integer sequences arrive as lists/tuples, objects exposing the buffer protocol (bytes,
//! bytearray, memoryview, array.array, numpy arrays) or objects with `__array__` (CPU torch
//! tensors; torch is never imported here). A read-only C-contiguous buffer whose items already
//! have the target width is read in place, without a copy. A writable one is copied first, with
//! the GIL held: the index reads without the GIL, when another thread could be changing it.
//! Other widths are range-checked and converted.
//! One-byte buffers (bytes, bytearray, memoryview of bytes) are raw little-endian words.
//! Conversion from a buffer happens in `view`, which needs no GIL.
//! Chunk keys (`u64`) may also be given as negative ints down to -2^63 and are stored as their
//! two's-complement bit pattern: LMCache's builtin-hash keys are signed `Py_hash_t` values.

use std::borrow::Cow;
use std::path::PathBuf;
use std::sync::Arc;

use pyo3::buffer::{ElementType, PyUntypedBuffer};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyInt, PyList, PySequence, PyString, PyTuple};

use crate::error::{Error, Result};
use crate::memory;

/// How many items ahead a list or tuple of ints is prefetched. A list not read recently has its
/// int objects in DRAM (~100 ns away) and reading one takes ~1.5 ns, so the prefetch runs about
/// a hundred items ahead (measured: 32 and 128 items ahead cut a cold 4,096-token lookup from
/// 19.5 to 17 and 15.5 µs; 256 was no better than 128).
const INT_PREFETCH_AHEAD: usize = 128;

/// The width of the integers an argument is converted to.
pub trait Word: Copy + Send + Sync + 'static {
    const BYTES: usize;
    const MAX: u64;
    /// The smallest value accepted; a negative one is stored as its two's complement.
    const MIN: i64;
    fn from_u64(v: u64) -> Self;
    fn from_le(b: &[u8]) -> Self;
}

impl Word for u32 {
    const BYTES: usize = 4;
    const MAX: u64 = u32::MAX as u64;
    const MIN: i64 = 0;
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
    const MIN: i64 = i64::MIN;
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
    /// A read-only C-contiguous buffer (bytes), read in place.
    Buffer(PyUntypedBuffer),
    /// A strided or writable buffer, copied into contiguous bytes while the GIL is held.
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
    Error::arg(format!(
        "{name}[{i}] = {v} is out of range {}..={}",
        T::MIN,
        T::MAX
    ))
}

/// A negative value `T` accepts (as its two's complement), if it does.
#[inline]
fn from_negative<T: Word>(v: i64) -> Option<T> {
    (v < 0 && v >= T::MIN).then(|| T::from_u64(v as u64))
}

impl<T: Word> IntsArg<T> {
    pub fn extract(obj: &Bound<'_, PyAny>, name: &'static str) -> Result<Self> {
        if let Ok(list) = obj.cast::<PyList>() {
            return Self::from_list(name, list);
        }
        if let Ok(tuple) = obj.cast::<PyTuple>() {
            return Self::from_tuple(name, tuple);
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
                // item by item as they come: a bad item stops at once, and no list of objects
                // (40 bytes an item) is built first
                let iter_failed = |e: PyErr| Error::ty(format!("{name}: iterating failed: {e}"));
                let mut out = Vec::with_capacity(seq.len().unwrap_or(0).min(1 << 20));
                for (i, item) in seq.try_iter().map_err(iter_failed)?.enumerate() {
                    push_item::<T>(name, i, &item.map_err(iter_failed)?, &mut out)?;
                }
                Ok(IntsArg {
                    name,
                    src: Src::Owned(out),
                })
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
            push_item::<T>(name, i, &item, &mut out)?;
        }
        Ok(IntsArg {
            name,
            src: Src::Owned(out),
        })
    }

    /// A list, read item by item in place: exact small ints through `fastint`, anything else
    /// (bools, int subclasses, big or negative ints, objects with `__index__`, non-ints) through
    /// `push_item`, so values and errors are those of the general path.
    fn from_list(name: &'static str, list: &Bound<'_, PyList>) -> Result<Self> {
        let Some(layout) = fastint::layout(list.py()) else {
            return Self::from_iter(name, list.len(), list.iter());
        };
        let ptr = list.as_ptr();
        let mut out: Vec<T> = Vec::with_capacity(list.len());
        let mut i = 0usize;
        loop {
            // SAFETY: `ptr` is a list (checked by the cast) kept alive by `list`; the GIL is held.
            // Its length is re-read after every slow item, which may run Python code (`__index__`)
            // that resizes the list; between slow items no Python code runs, so the length holds.
            let len = unsafe { ffi::PyList_GET_SIZE(ptr) } as usize;
            // The run of fast items is written straight into reserved space (no capacity check
            // per item); `out` holds one value per item read so far, so its length is `i`.
            out.reserve(len.saturating_sub(i));
            let dst = out.as_mut_ptr();
            while i < len {
                if i + INT_PREFETCH_AHEAD < len {
                    // ints live wherever CPython allocated them: start loading one a few
                    // places ahead (SAFETY: the index is within the list)
                    memory::prefetch(unsafe {
                        ffi::PyList_GET_ITEM(ptr, (i + INT_PREFETCH_AHEAD) as ffi::Py_ssize_t)
                    });
                }
                // SAFETY: i < len; the item is borrowed from the list, which holds it meanwhile
                let item = unsafe { ffi::PyList_GET_ITEM(ptr, i as ffi::Py_ssize_t) };
                // SAFETY: a live object pointer; `read` only reads an exact int's fields
                match unsafe { layout.read(item) } {
                    // SAFETY: i < len <= capacity (reserved above)
                    Some(v) if v <= T::MAX => unsafe { dst.add(i).write(T::from_u64(v)) },
                    Some(v) => return Err(out_of_range::<T>(name, i, v)),
                    None => break,
                }
                i += 1;
            }
            // SAFETY: every element below `i` was written (by `push_item` or just above)
            unsafe { out.set_len(i) };
            if i >= len {
                break;
            }
            // SAFETY: as above; the new reference keeps the item alive while Python code runs
            let item = unsafe {
                Bound::from_borrowed_ptr(list.py(), ffi::PyList_GET_ITEM(ptr, i as ffi::Py_ssize_t))
            };
            push_item::<T>(name, i, &item, &mut out)?;
            i += 1;
        }
        Ok(IntsArg {
            name,
            src: Src::Owned(out),
        })
    }

    /// A tuple: as `from_list` (a tuple cannot change length).
    fn from_tuple(name: &'static str, tuple: &Bound<'_, PyTuple>) -> Result<Self> {
        let Some(layout) = fastint::layout(tuple.py()) else {
            return Self::from_iter(name, tuple.len(), tuple.iter());
        };
        let ptr = tuple.as_ptr();
        // SAFETY: `ptr` is a tuple kept alive by `tuple`
        let len = unsafe { ffi::PyTuple_GET_SIZE(ptr) } as usize;
        let mut out = Vec::with_capacity(len);
        for i in 0..len {
            if i + INT_PREFETCH_AHEAD < len {
                // as in `from_list` (SAFETY: the index is within the tuple)
                memory::prefetch(unsafe {
                    ffi::PyTuple_GET_ITEM(ptr, (i + INT_PREFETCH_AHEAD) as ffi::Py_ssize_t)
                });
            }
            // SAFETY: i < len; borrowed from the tuple, which outlives this call
            let item = unsafe { ffi::PyTuple_GET_ITEM(ptr, i as ffi::Py_ssize_t) };
            // SAFETY: a live object pointer
            match unsafe { layout.read(item) } {
                Some(v) if v <= T::MAX => out.push(T::from_u64(v)),
                Some(v) => return Err(out_of_range::<T>(name, i, v)),
                None => {
                    // SAFETY: as above
                    let item = unsafe { Bound::from_borrowed_ptr(tuple.py(), item) };
                    push_item::<T>(name, i, &item, &mut out)?;
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
        let data = if buf.is_c_contiguous() && buf.readonly() {
            Data::Buffer(buf)
        } else if buf.is_c_contiguous() {
            // Writable: another thread may change it while the index reads without the GIL
            // (numpy releases it to copy), so take a copy now, GIL held, through raw pointers.
            let n = buf.len_bytes();
            let mut v = vec![0u8; n];
            if n > 0 {
                // SAFETY: a C-contiguous exported buffer of n bytes, alive while `buf` holds it
                unsafe {
                    std::ptr::copy_nonoverlapping(buf.buf_ptr() as *const u8, v.as_mut_ptr(), n)
                };
            }
            Data::Gathered(v)
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
                    if v < 0 {
                        match from_negative::<T>(v) {
                            Some(x) => out.push(x),
                            None => return Err(out_of_range::<T>(name, i, v)),
                        }
                    } else if v as u64 > T::MAX {
                        return Err(out_of_range::<T>(name, i, v));
                    } else {
                        out.push(T::from_u64(v as u64));
                    }
                }
                Ok(Cow::Owned(out))
            }
        }
    }
}

/// Convert one item the general way (any int, or an object with `__index__`), naming the
/// problem on failure.
fn push_item<T: Word>(
    name: &str,
    i: usize,
    item: &Bound<'_, PyAny>,
    out: &mut Vec<T>,
) -> Result<()> {
    match item.extract::<u64>() {
        Ok(v) if v <= T::MAX => {
            out.push(T::from_u64(v));
            Ok(())
        }
        Ok(v) => Err(out_of_range::<T>(name, i, v)),
        Err(_) => {
            // not a u64: maybe a negative value, which chunk keys accept down to -2^63
            let negative = if T::MIN < 0 {
                item.extract::<i64>().ok().and_then(from_negative::<T>)
            } else {
                None
            };
            if let Some(x) = negative {
                out.push(x);
                Ok(())
            } else if item.is_instance_of::<PyInt>() {
                let repr = item.str().map(|s| s.to_string()).unwrap_or_default();
                Err(out_of_range::<T>(name, i, repr))
            } else {
                Err(Error::ty(format!(
                    "{name}[{i}] must be an int, not {}",
                    type_name(item)
                )))
            }
        }
    }
}

/// Whether lists and tuples of int are read straight from the int objects (`fastint`) on this
/// interpreter, rather than through the C API one item at a time.
pub fn fast_int_lists(py: Python<'_>) -> bool {
    fastint::layout(py).is_some()
}

/// Reading the value of an exact, non-negative `int` of up to three 30-bit digits straight
/// from the object, without a call into the interpreter.
///
/// CPython's `int` is `PyObject` header, then a size word, then 30-bit digits (`u32`). The size
/// word sits right before the digits in every version this supports, and the digits start at
/// `int.__basicsize__`: up to 3.11 it is `ob_size` (signed digit count), from 3.12 it is `lv_tag`
/// (`ndigits << 3 | sign`, sign 0 positive / 1 zero / 2 negative; 3.14 marks the cached small
/// ints immortal in bit 2, which the reads here ignore). The layout is only used on
/// CPython 3.10-3.14 with the GIL, 30-bit digits, and after a self-test on known values at
/// first use agrees with the interpreter's own conversion; otherwise every item goes through
/// the general path.
mod fastint {
    use pyo3::sync::PyOnceLock;

    use pyo3::ffi;
    use pyo3::prelude::*;
    use pyo3::types::PyInt;

    pub struct Layout {
        /// `PyLong_Type`, compared by address: subclasses (bool included) are not exact ints.
        int_type: usize,
        /// Byte offset of the size word and of the first digit.
        size_off: usize,
        digit_off: usize,
        /// 3.12+: the size word is `lv_tag`.
        tagged: bool,
        /// The size word of a one-digit positive int, after `size_mask`.
        one_digit: isize,
        size_mask: isize,
    }

    // A PyOnceLock, not std's OnceLock: the probe runs Python code (imports) that may release
    // the GIL, and a second thread must not wait for it while holding the GIL (a deadlock).
    static LAYOUT: PyOnceLock<Option<Layout>> = PyOnceLock::new();

    /// The layout when the fast path is safe on this interpreter.
    #[inline]
    pub fn layout(py: Python<'_>) -> Option<&'static Layout> {
        LAYOUT.get_or_init(py, || probe(py).ok().flatten()).as_ref()
    }

    fn probe(py: Python<'_>) -> PyResult<Option<Layout>> {
        let sys = py.import("sys")?;
        let implementation: String = sys.getattr("implementation")?.getattr("name")?.extract()?;
        let (major, minor): (u32, u32) = (
            sys.getattr("version_info")?.get_item(0)?.extract()?,
            sys.getattr("version_info")?.get_item(1)?.extract()?,
        );
        let info = sys.getattr("int_info")?;
        let bits: u32 = info.getattr("bits_per_digit")?.extract()?;
        let sizeof_digit: u32 = info.getattr("sizeof_digit")?.extract()?;
        let gil_disabled = py
            .import("sysconfig")?
            .call_method1("get_config_var", ("Py_GIL_DISABLED",))?
            .is_truthy()?;
        let int_type = py.get_type::<PyInt>();
        let basic: usize = int_type.getattr("__basicsize__")?.extract()?;
        let item: usize = int_type.getattr("__itemsize__")?.extract()?;
        if implementation != "cpython"
            || major != 3
            || !(10..=14).contains(&minor)
            || bits != 30
            || sizeof_digit != 4
            || item != 4
            || gil_disabled
            || basic < 8 + std::mem::size_of::<ffi::PyObject>()
        {
            return Ok(None);
        }
        let layout = Layout {
            int_type: int_type.as_ptr() as usize,
            size_off: basic - 8,
            digit_off: basic,
            tagged: minor >= 12,
            one_digit: if minor >= 12 { 1 << 3 } else { 1 },
            size_mask: if minor >= 12 { !4 } else { !0 },
        };
        // self-test: every value, read here, must be what the interpreter says it is
        let mut probes: Vec<Bound<'_, PyAny>> = Vec::new();
        for e in [0u32, 1, 29, 30, 31, 32, 59, 60, 61, 63, 64, 89, 90, 91, 100] {
            let p = 1u128 << e;
            for v in [p - 1, p, p + 1] {
                probes.push(v.into_pyobject(py)?.into_any());
                probes.push((-(v as i128)).into_pyobject(py)?.into_any());
            }
        }
        for v in [5u64, 255, 256, 65535, 128_000, 4_294_967_295, 4_294_967_296] {
            probes.push(v.into_pyobject(py)?.into_any());
        }
        for p in &probes {
            let expect = p.extract::<u64>().ok();
            // SAFETY: a live int
            let got = unsafe { layout.read(p.as_ptr()) };
            // the fast read may decline (None) for any value, but never disagree
            if got.is_some() && got != expect {
                return Ok(None);
            }
            // and it must not decline the small values a token list is made of
            if got.is_none() && expect.is_some_and(|v| v < 1 << 60) {
                return Ok(None);
            }
        }
        Ok(Some(layout))
    }

    impl Layout {
        /// The value of `obj` when it is an exact int in 0..2^64 of at most three digits;
        /// None for anything else (left to the general path).
        ///
        /// # Safety
        /// `obj` points to a live Python object and the GIL is held.
        #[inline(always)]
        pub unsafe fn read(&self, obj: *mut ffi::PyObject) -> Option<u64> {
            if ffi::Py_TYPE(obj) as usize != self.int_type {
                return None;
            }
            let base = obj as *const u8;
            let size = (base.add(self.size_off) as *const isize).read();
            let d = base.add(self.digit_off) as *const u32;
            // one positive digit (every token below 2^30) in one compare: `lv_tag` 1 << 3 (bit 2
            // masked), or `ob_size` 1
            if size & self.size_mask == self.one_digit {
                return Some(d.read() as u64);
            }
            let n = if self.tagged {
                let tag = size as usize;
                match tag & 3 {
                    0 => tag >> 3,
                    1 => return Some(0),
                    _ => return None,
                }
            } else if size < 0 {
                return None;
            } else {
                size as usize
            };
            match n {
                0 => Some(0),
                1 => Some(d.read() as u64),
                2 => Some(d.read() as u64 | (d.add(1).read() as u64) << 30),
                3 => {
                    let hi = d.add(2).read() as u64;
                    (hi < 16).then(|| d.read() as u64 | (d.add(1).read() as u64) << 30 | hi << 60)
                }
                _ => None,
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

/// A signed 64-bit int argument.
pub fn i64_arg(obj: &Bound<'_, PyAny>, name: &str) -> Result<i64> {
    if !obj.is_instance_of::<PyInt>() {
        return Err(Error::ty(format!(
            "{name} must be an int, not {}",
            type_name(obj)
        )));
    }
    obj.extract::<i64>().map_err(|_| {
        let repr = obj.str().map(|s| s.to_string()).unwrap_or_default();
        Error::arg(format!(
            "{name} = {repr} is out of range {}..={}",
            i64::MIN,
            i64::MAX
        ))
    })
}

/// A tuple of str as strings; InvalidTypeError naming `name` (and the item) for anything else.
pub fn str_tuple(obj: &Bound<'_, PyAny>, name: &str) -> Result<Vec<String>> {
    let tuple = obj.cast::<PyTuple>().map_err(|_| {
        Error::ty(format!(
            "{name} must be a tuple of str, not {}",
            type_name(obj)
        ))
    })?;
    tuple
        .iter()
        .enumerate()
        .map(|(k, item)| str_arg(&item, &format!("{name}[{k}]")).map(|s| s.to_string()))
        .collect()
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
