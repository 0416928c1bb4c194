use thiserror::Error;

#[derive(Debug, Error)]
pub enum QuantError {
    #[error("unknown dtype '{0}' (expected float32, bfloat16 or float16)")]
    UnknownDType(String),
    #[error("{what}: {got} bytes, expected {expected}")]
    ByteLength {
        what: String,
        expected: usize,
        got: usize,
    },
    #[error("{what}: data is not aligned to {align} bytes")]
    Misaligned { what: String, align: usize },
    #[error("GGML type {0} is not supported (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1)")]
    UnsupportedGgmlType(u32),
    #[error(
        "GGML tensor with {elements} elements is not a whole number of {block}-element blocks"
    )]
    PartialBlock { elements: usize, block: usize },
}
