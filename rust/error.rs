//! The one error type of the core. The Python layer maps each variant to one exception class
//! (see `py/errors.rs`); nothing here knows about Python.

use std::fmt;
use std::path::{Path, PathBuf};

/// Everything the index can refuse or fail at.
#[derive(Debug)]
pub enum Error {
    /// An argument has the right type but a bad value (negative token, reserved instance id, ...).
    InvalidArgument(String),
    /// An argument has a type the index does not accept.
    InvalidType(String),
    /// A snapshot file is corrupt, truncated, of another format version or for another index.
    Snapshot(String),
    /// An operating-system error while reading or writing a snapshot, and the file it concerns
    /// (set by `at` where the path is known; an operator must be told which file failed).
    Io(std::io::Error, Option<PathBuf>),
    /// `check_invariants` found a broken invariant (a bug, never caused by input).
    Invariant(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn arg(msg: impl Into<String>) -> Self {
        Error::InvalidArgument(msg.into())
    }
    pub fn ty(msg: impl Into<String>) -> Self {
        Error::InvalidType(msg.into())
    }
    pub fn snapshot(msg: impl Into<String>) -> Self {
        Error::Snapshot(msg.into())
    }
    pub fn invariant(msg: impl Into<String>) -> Self {
        Error::Invariant(msg.into())
    }
    /// This error with `path` as the file an OS error concerns (unless it already names one).
    pub fn at(self, path: &Path) -> Self {
        match self {
            Error::Io(e, None) => Error::Io(e, Some(path.to_path_buf())),
            other => other,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidArgument(m) | Error::InvalidType(m) | Error::Snapshot(m) => {
                f.write_str(m)
            }
            Error::Io(e, None) => write!(f, "{e}"),
            Error::Io(e, Some(p)) => write!(f, "{e}: {}", p.display()),
            Error::Invariant(m) => write!(f, "invariant broken: {m}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Io(e, None)
    }
}
