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
    #[error("GGML type {name} is not supported (supported: {supported})")]
    UnsupportedGgmlType {
        name: String,
        supported: &'static str,
    },
    #[error("unknown quantization algorithm '{0}' (expected one of w8a16, w4a16, w4a16_awq, w4a16_gptq, w8a16_gptq, w8a8_sq, fp8, nvfp4; KV cache: int8, fp8)")]
    UnknownAlgo(String),
    #[error("quant config: {field}: {msg}")]
    InvalidConfig { field: &'static str, msg: String },
    #[error("quant config for layer '{layer}': {source}")]
    Layer {
        layer: String,
        source: Box<QuantError>,
    },
    #[error("exclude_modules: '{pattern}' matches no module of this model (modules are named like {examples})")]
    UnknownModule { pattern: String, examples: String },
    #[error("{0}")]
    Shape(String),
    #[error("module '{module}' has no calibration {what}: the calibration run never reached it")]
    Uncalibrated { module: String, what: &'static str },
    #[error(transparent)]
    Kernel(#[from] trtllm_kernels::KernelError),
    #[error(
        "GGML tensor with {elements} elements is not a whole number of {block}-element blocks"
    )]
    PartialBlock { elements: usize, block: usize },
}
