//! Weight storage and quantization for trtllm-rs: the element types and packed formats an engine
//! stores weights in, the quantization configs and algorithms (RTN, AWQ, GPTQ, SmoothQuant, FP8,
//! NVFP4) that produce them, calibration statistics, and the GGML block formats of GGUF files.
//!
//! Architecture invariant: this crate knows storage, not models. It never sees a layer name.

mod calib;
pub mod codec;
mod config;
mod dtype;
mod error;
mod format;
pub mod ggml;
mod ggml_blocks;
mod ggml_pack;
mod gptq;
mod quantize;
mod scaling;

pub use calib::{ActStats, CalibNeeds, Calibration};
pub use config::{LayerQuantConfig, QuantAlgo, QuantConfig, QuantMode, KV_CACHE_QUANT_ALGOS};
pub use dtype::DType;
pub use error::QuantError;
pub use format::{pack_int, quantize_rtn, GroupParams, PackedRef, PackedWeight, WeightFormat};
pub use gptq::quantize_gptq;
pub use quantize::{QuantReport, QuantizedLinear, Quantizer, LM_HEAD};
pub use trtllm_kernels as kernels;

pub type Result<T> = std::result::Result<T, QuantError>;
