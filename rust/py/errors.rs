//! Exception classes and the one `Error -> PyErr` mapping.
//!
//! The classes need multiple inheritance (`InvalidArgumentError(LMCacheError, ValueError)`),
//! which `create_exception!` cannot express, so they are built once with `type(...)`.

use pyo3::exceptions::{PyException, PyOSError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyTuple, PyType};

use crate::error::Error;

pub struct ExceptionTypes {
    pub lmcache: Py<PyType>,
    pub invalid_argument: Py<PyType>,
    pub invalid_type: Py<PyType>,
    pub snapshot: Py<PyType>,
}

static TYPES: PyOnceLock<ExceptionTypes> = PyOnceLock::new();

fn make(
    py: Python<'_>,
    name: &str,
    bases: Vec<Bound<'_, PyType>>,
    doc: &str,
) -> PyResult<Py<PyType>> {
    let dict = PyDict::new(py);
    dict.set_item("__module__", "lmcache_rs._core")?;
    dict.set_item("__doc__", doc)?;
    let bases = PyTuple::new(py, bases)?;
    let ty = py.get_type::<PyType>().call1((name, bases, dict))?;
    Ok(ty.cast_into::<PyType>()?.unbind())
}

pub fn types(py: Python<'_>) -> PyResult<&ExceptionTypes> {
    TYPES.get_or_try_init(py, || {
        let root = make(
            py,
            "LMCacheError",
            vec![py.get_type::<PyException>()],
            "Root of every error the index raises.",
        )?;
        let sub = |name: &str, builtin: Bound<'_, PyType>, doc: &str| {
            make(py, name, vec![root.bind(py).clone(), builtin], doc)
        };
        Ok(ExceptionTypes {
            invalid_argument: sub(
                "InvalidArgumentError",
                py.get_type::<PyValueError>(),
                "An argument has the right type but a bad value (negative token, unknown op, ...).",
            )?,
            invalid_type: sub(
                "InvalidTypeError",
                py.get_type::<PyTypeError>(),
                "An argument has a type the index does not accept.",
            )?,
            snapshot: sub(
                "SnapshotError",
                py.get_type::<PyValueError>(),
                "A dump file is corrupt, truncated, of another format version or for another index.",
            )?,
            lmcache: root,
        })
    })
}

/// An OS error as Python raises its own: `OSError(errno, strerror, filename)`, which CPython
/// turns into the matching subclass (FileNotFoundError, PermissionError, ...) with `.errno` and
/// `.filename` set, so the message names the file.
fn os_error(io: std::io::Error, path: Option<std::path::PathBuf>) -> PyErr {
    let Some(path) = path else {
        return PyErr::from(io);
    };
    let filename = path.to_string_lossy().into_owned();
    match io.raw_os_error() {
        Some(errno) => {
            // io::Error's text ends in " (os error N)": Python's strerror has no such tail
            let text = io.to_string();
            let strerror = text
                .strip_suffix(&format!(" (os error {errno})"))
                .unwrap_or(&text)
                .to_owned();
            PyOSError::new_err((errno, strerror, filename))
        }
        None => PyOSError::new_err(format!("{io}: {filename}")),
    }
}

impl From<Error> for PyErr {
    fn from(e: Error) -> PyErr {
        Python::attach(|py| {
            let t = match types(py) {
                Ok(t) => t,
                Err(err) => return err,
            };
            let (ty, msg) = match e {
                Error::InvalidArgument(m) => (&t.invalid_argument, m),
                Error::InvalidType(m) => (&t.invalid_type, m),
                Error::Snapshot(m) => (&t.snapshot, m),
                e @ Error::Invariant(_) => (&t.lmcache, e.to_string()),
                Error::Io(io, path) => return os_error(io, path),
            };
            PyErr::from_type(ty.bind(py).clone(), (msg,))
        })
    }
}
