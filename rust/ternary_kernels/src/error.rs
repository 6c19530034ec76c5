//! The crate's one error type and, with the `python` feature, its one conversion to a Python exception.
//!
//! Bad input (shape, dtype, layout, values) is `Invalid` and becomes `ValueError`; a wrong Python type
//! becomes `TypeError`; an instruction set or thread setup the machine cannot give becomes `RuntimeError`.

use std::fmt;

#[derive(Debug, Clone, PartialEq)]
pub enum Error {
    /// An argument has the wrong shape, dtype, layout or values; `arg` names it.
    Invalid { arg: &'static str, msg: String },
    /// An argument is not even the right kind of object (e.g. a list where an ndarray is needed).
    WrongType { arg: &'static str, msg: String },
    /// The requested kernel path needs CPU features this machine lacks, or the env var is malformed.
    Isa(String),
    /// The thread pool or the CPU topology could not be set up.
    Threads(String),
    /// Memory for the weights could not be mapped.
    Memory(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// Shorthand for the common case: `invalid("codes", format!(...))`.
pub fn invalid(arg: &'static str, msg: impl Into<String>) -> Error {
    Error::Invalid { arg, msg: msg.into() }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Invalid { arg, msg } | Error::WrongType { arg, msg } => write!(f, "{arg}: {msg}"),
            Error::Isa(msg) => write!(f, "kernel path: {msg}"),
            Error::Threads(msg) => write!(f, "threads: {msg}"),
            Error::Memory(msg) => write!(f, "memory: {msg}"),
        }
    }
}

impl std::error::Error for Error {}

#[cfg(feature = "python")]
impl From<Error> for pyo3::PyErr {
    fn from(e: Error) -> Self {
        use pyo3::exceptions::{PyMemoryError, PyRuntimeError, PyTypeError, PyValueError};
        let text = e.to_string();
        match e {
            Error::Invalid { .. } => PyValueError::new_err(text),
            Error::WrongType { .. } => PyTypeError::new_err(text),
            Error::Isa(_) | Error::Threads(_) => PyRuntimeError::new_err(text),
            Error::Memory(_) => PyMemoryError::new_err(text),
        }
    }
}
