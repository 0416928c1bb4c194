use thiserror::Error;

/// Errors a kernel reports instead of panicking on inconsistent shapes.
#[derive(Debug, Error)]
pub enum KernelError {
    #[error("{op}: {what} has {got} elements, expected {expected}")]
    ShapeMismatch {
        op: &'static str,
        what: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("{op}: {what} {index} is out of range (must be < {limit})")]
    OutOfRange {
        op: &'static str,
        what: &'static str,
        index: usize,
        limit: usize,
    },
    /// The CUDA driver, a device or a launch failed (the message says which and why).
    #[error("CUDA: {0}")]
    Cuda(String),
}

/// Checks that a buffer has exactly the length a kernel needs.
pub(crate) fn check_len(
    op: &'static str,
    what: &'static str,
    got: usize,
    expected: usize,
) -> Result<(), KernelError> {
    if got == expected {
        Ok(())
    } else {
        Err(KernelError::ShapeMismatch {
            op,
            what,
            expected,
            got,
        })
    }
}
