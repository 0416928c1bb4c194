//! Linear-layer launchers, `y[m × n] = x[m × k] · Wᵀ (+ bias)` for each weight storage: the
//! weight-only kernels over packed codes, cuBLAS for dense f32 and half-precision weights, and the
//! 8-bit tensor-core GEMMs (W8A8, FP8) with the activation quantization they need.

use std::ffi::c_void;

use cudarc::cublas::result::gemm_ex;
use cudarc::cublas::sys::{
    cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType_t,
};
use cudarc::driver::{
    CudaSlice, DevicePtr, DevicePtrMut, DeviceRepr, LaunchArgs, LaunchConfig, PushKernelArg,
};

use super::ops::{check_rows, elementwise, grid, int, launch, ROW_THREADS};
use super::{CudaDevice, Kernel};
use crate::cpu::quant::{check_blocks, check_group, groups};
use crate::error::check_len;
use crate::{KernelError, Result};

/// `gemv_*`: output features per block (one warp each).
const GEMV_WARPS: usize = 4;
/// Output tile of the weight-only `gemm_*` kernels (256 threads) and of the tensor-core GEMMs
/// (128 threads).
const TILE: usize = 64;
/// Up to this many activation rows go through the matrix-vector kernels: decode batches are
/// bound by reading the weights once, which those kernels do with every GPU block busy.
pub(super) const GEMV_MAX_ROWS: usize = 8;
/// The FP8 tensor-core GEMM, present only in PTX built for sm_89 and newer.
const FP8_GEMM: Kernel = Kernel::gemm_fp8_e4m3;

/// A packed weight matrix on the device, in the CPU formats' layouts.
pub enum DeviceWeights {
    Int8 {
        q: CudaSlice<i8>,
        scales: CudaSlice<f32>,
        offsets: Option<CudaSlice<f32>>,
        group: usize,
    },
    Int4 {
        q: CudaSlice<u8>,
        scales: CudaSlice<f32>,
        offsets: Option<CudaSlice<f32>>,
        group: usize,
    },
    Fp8 {
        q: CudaSlice<u8>,
        scales: CudaSlice<f32>,
    },
    Nvfp4 {
        q: CudaSlice<u8>,
        block_scales: CudaSlice<u8>,
        global_scale: f32,
    },
}

/// Which 16-bit float a half-precision weight holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Half {
    Bf16,
    F16,
}

impl Half {
    /// The matrix-vector kernel over these weights and the activations' conversion to them.
    fn kernels(self) -> [Kernel; 2] {
        match self {
            Half::Bf16 => [Kernel::gemv_bf16, Kernel::f32_to_bf16],
            Half::F16 => [Kernel::gemv_f16, Kernel::f32_to_f16],
        }
    }
}

/// The shapes every linear launcher checks: `x` holds whole `k`-wide rows, `y` and `bias` fit.
fn check_problem(
    op: &'static str,
    x: &CudaSlice<f32>,
    (n, k): (usize, usize),
    bias: Option<&CudaSlice<f32>>,
    y: &CudaSlice<f32>,
) -> Result<usize> {
    let m = check_rows(op, x.len(), k)?;
    check_len(op, "y", y.len(), m * n)?;
    if let Some(b) = bias {
        check_len(op, "bias", b.len(), n)?;
    }
    Ok(m)
}

fn gemv_grid(n: usize) -> Result<LaunchConfig> {
    grid(n.div_ceil(GEMV_WARPS), (GEMV_WARPS * 32) as u32)
}

fn tile_grid(m: usize, n: usize, threads: u32) -> Result<LaunchConfig> {
    Ok(LaunchConfig {
        grid_dim: (
            int("tiles", n.div_ceil(TILE))? as u32,
            int("tiles", m.div_ceil(TILE))? as u32,
            1,
        ),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// `[m, n, k]` as the kernels' `int`s.
fn dims(m: usize, n: usize, k: usize) -> Result<[i32; 3]> {
    Ok([int("m", m)?, int("n", n)?, int("k", k)?])
}

/// Pushes the arguments every linear kernel ends with: `bias` (or null), `y`, `m`, `n`, `k`.
fn arg_out<'a>(
    b: &mut LaunchArgs<'a>,
    bias: Option<&'a CudaSlice<f32>>,
    y: &'a mut CudaSlice<f32>,
    [m, n, k]: &'a [i32; 3],
) {
    arg_opt(b, bias);
    b.arg(y).arg(m).arg(n).arg(k);
}

/// Pushes an optional buffer (a bias, int8/int4 offsets), or a null pointer for none.
fn arg_opt<'a>(b: &mut LaunchArgs<'a>, buf: Option<&'a CudaSlice<f32>>) {
    const NULL: u64 = 0;
    match buf {
        Some(buf) => b.arg(buf),
        None => b.arg(&NULL),
    };
}

impl CudaDevice {
    /// Weight-only product reading the packed codes directly.
    pub fn linear(
        &self,
        w: &DeviceWeights,
        x: &CudaSlice<f32>,
        (n, k): (usize, usize),
        bias: Option<&CudaSlice<f32>>,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        check_blocks("cuda linear", k, 32)?;
        let m = check_problem("cuda linear", x, (n, k), bias, y)?;
        check_weights(w, n, k)?;
        let dims = dims(m, n, k)?;
        let gemv = m <= GEMV_MAX_ROWS || self.invariant;
        let cfg = match gemv {
            true => gemv_grid(n)?,
            false => tile_grid(m, n, 256)?,
        };
        use Kernel::*;
        let ([vector, matrix], group) = match w {
            DeviceWeights::Int8 { group, .. } => ([gemv_int8, gemm_int8], *group),
            DeviceWeights::Int4 { group, .. } => ([gemv_int4, gemm_int4], *group),
            DeviceWeights::Fp8 { .. } => ([gemv_fp8, gemm_fp8], 0),
            DeviceWeights::Nvfp4 { .. } => ([gemv_nvfp4, gemm_nvfp4], 0),
        };
        let kernel = if gemv { vector } else { matrix };
        let g = int("group", group)?;
        let mut b = self.builder(kernel)?;
        match w {
            DeviceWeights::Int8 {
                q, scales, offsets, ..
            } => {
                b.arg(q).arg(scales);
                arg_opt(&mut b, offsets.as_ref());
                b.arg(&g)
            }
            DeviceWeights::Int4 {
                q, scales, offsets, ..
            } => {
                b.arg(q).arg(scales);
                arg_opt(&mut b, offsets.as_ref());
                b.arg(&g)
            }
            DeviceWeights::Fp8 { q, scales } => b.arg(q).arg(scales),
            DeviceWeights::Nvfp4 {
                q,
                block_scales,
                global_scale,
            } => b.arg(q).arg(block_scales).arg(global_scale),
        };
        b.arg(x);
        arg_out(&mut b, bias, y, &dims);
        launch(b, cfg, kernel)
    }

    /// Dense f32 weights (`[n × k]`, row-major) through cuBLAS sgemm, or in batch-invariant
    /// mode the matrix-vector kernel.
    pub fn dense_linear(
        &self,
        w: &CudaSlice<f32>,
        x: &CudaSlice<f32>,
        (n, k): (usize, usize),
        bias: Option<&CudaSlice<f32>>,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        check_len("cuda dense linear", "weight", w.len(), n * k)?;
        let m = check_problem("cuda dense linear", x, (n, k), bias, y)?;
        if self.invariant {
            check_blocks("cuda dense linear", k, 4)?;
            return self.gemv_dense((w, Kernel::gemv_f32), x, (m, n, k), bias, y);
        }
        self.cublas_gemm(
            (w, cudaDataType_t::CUDA_R_32F),
            (x, cudaDataType_t::CUDA_R_32F),
            (m, n, k),
            bias,
            y,
        )
    }

    /// bf16 / f16 weights kept in 16 bits: decode batches read them in the matrix-vector kernel
    /// with f32 activations (the CPU's arithmetic); larger ones round the activations to the
    /// weights' type and run a cuBLAS GEMM with f32 accumulation and output, as TensorRT does.
    pub fn half_linear(
        &self,
        (w, half): (&CudaSlice<u16>, Half),
        x: &CudaSlice<f32>,
        (n, k): (usize, usize),
        bias: Option<&CudaSlice<f32>>,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        check_blocks("cuda half linear", k, 32)?;
        check_len("cuda half linear", "weight", w.len(), n * k)?;
        let m = check_problem("cuda half linear", x, (n, k), bias, y)?;
        if m <= GEMV_MAX_ROWS || self.invariant {
            return self.gemv_dense((w, half.kernels()[0]), x, (m, n, k), bias, y);
        }
        let mut xh = self.output::<u16>(x.len())?;
        let count = int("n", x.len())?;
        let mut b = self.builder(half.kernels()[1])?;
        b.arg(x).arg(&mut xh).arg(&count);
        launch(b, elementwise(x.len())?, half.kernels()[1])?;
        let dtype = match half {
            Half::Bf16 => cudaDataType_t::CUDA_R_16BF,
            Half::F16 => cudaDataType_t::CUDA_R_16F,
        };
        self.cublas_gemm((w, dtype), (&xh, dtype), (m, n, k), bias, y)
    }

    /// The matrix-vector kernel over dense rows (f32 or 16-bit), f32 activations.
    fn gemv_dense<W: DeviceRepr>(
        &self,
        (w, kernel): (&CudaSlice<W>, Kernel),
        x: &CudaSlice<f32>,
        (m, n, k): (usize, usize, usize),
        bias: Option<&CudaSlice<f32>>,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let dims = dims(m, n, k)?;
        let mut b = self.builder(kernel)?;
        b.arg(w).arg(x);
        arg_out(&mut b, bias, y, &dims);
        launch(b, gemv_grid(n)?, kernel)
    }

    /// `y = W · x` in cuBLAS's column-major terms: row-major `y[m × n]` is column-major
    /// `yᵀ = W · xᵀ`, so `W` goes in transposed. The bias, when given, is written into `y` first
    /// and accumulated onto (β = 1). Lengths are checked by the caller.
    fn cublas_gemm<W, X>(
        &self,
        (w, w_type): (&CudaSlice<W>, cudaDataType_t),
        (x, x_type): (&CudaSlice<X>, cudaDataType_t),
        (m, n, k): (usize, usize, usize),
        bias: Option<&CudaSlice<f32>>,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let [mi, ni, ki] = dims(m, n, k)?;
        let beta: f32 = match bias {
            Some(bias) => {
                let mut b = self.builder(Kernel::bias_rows_f32)?;
                b.arg(&mut *y).arg(bias).arg(&mi).arg(&ni);
                launch(b, elementwise(m * n)?, Kernel::bias_rows_f32)?;
                1.0
            }
            None => 0.0,
        };
        let alpha = 1.0f32;
        let blas = self.blas()?;
        let (wp, _w) = w.device_ptr(&self.stream);
        let (xp, _x) = x.device_ptr(&self.stream);
        let (yp, _y) = y.device_ptr_mut(&self.stream);
        // SAFETY: the caller checked w (n·k), x (m·k) and y (m·n) against these dimensions; the
        // guards above keep the buffers' stream ordering until the call is queued.
        unsafe {
            gemm_ex(
                *blas.handle(),
                cublasOperation_t::CUBLAS_OP_T,
                cublasOperation_t::CUBLAS_OP_N,
                ni,
                mi,
                ki,
                (&alpha as *const f32).cast::<c_void>(),
                wp as *const c_void,
                w_type,
                ki,
                xp as *const c_void,
                x_type,
                ki,
                (&beta as *const f32).cast::<c_void>(),
                yp as *mut c_void,
                cudaDataType_t::CUDA_R_32F,
                ni,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| KernelError::Cuda(format!("cuBLAS GEMM ({m} × {n} × {k}): {e:?}")))
    }

    /// W8A8 (SmoothQuant): `x` quantized per row to int8 on the device, then an int8 product
    /// with exact int32 accumulation (dp4a for decode, tensor cores otherwise); per-channel
    /// weight scales (`group == k`), as the CPU's `WeightData::W8A8`.
    pub fn w8a8_linear(
        &self,
        (q, scales): (&CudaSlice<i8>, &CudaSlice<f32>),
        x: &CudaSlice<f32>,
        (n, k): (usize, usize),
        bias: Option<&CudaSlice<f32>>,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let op = "cuda w8a8 linear";
        check_blocks(op, k, 32)?;
        check_len(op, "int8 codes", q.len(), n * k)?;
        check_len(op, "scales (one per row)", scales.len(), n)?;
        let m = check_problem(op, x, (n, k), bias, y)?;
        let dims = dims(m, n, k)?;
        let (mut xq, mut xs) = (self.output::<i8>(m * k)?, self.output::<f32>(m)?);
        let mut b = self.builder(Kernel::quantize_rows_int8)?;
        b.arg(x).arg(&mut xq).arg(&mut xs).arg(&dims[2]);
        launch(b, grid(m, ROW_THREADS)?, Kernel::quantize_rows_int8)?;
        let (kernel, cfg) = match m <= GEMV_MAX_ROWS {
            true => (Kernel::gemv_w8a8, gemv_grid(n)?),
            false => (Kernel::gemm_w8a8, tile_grid(m, n, 128)?),
        };
        let mut b = self.builder(kernel)?;
        b.arg(&xq).arg(&xs).arg(q).arg(scales);
        arg_out(&mut b, bias, y, &dims);
        launch(b, cfg, kernel)
    }

    /// Whether this GPU runs the FP8 tensor-core GEMM ([`Self::fp8_linear`]): sm_90 PTX loaded.
    pub fn has_fp8_tensor_cores(&self) -> bool {
        self.functions.contains_key(FP8_GEMM.name())
    }

    /// FP8 on the tensor cores: `x` quantized to E4M3 with the layer's static `input_scale`, an
    /// E4M3 × E4M3 product with f32 accumulation, scaled by `input_scale · scales[j]`.
    pub fn fp8_linear(
        &self,
        (q, scales): (&CudaSlice<u8>, &CudaSlice<f32>),
        input_scale: f32,
        x: &CudaSlice<f32>,
        (n, k): (usize, usize),
        bias: Option<&CudaSlice<f32>>,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let op = "cuda fp8 linear";
        if !self.has_fp8_tensor_cores() {
            return Err(KernelError::Cuda(format!(
                "{} (compute capability {}.{}) has no FP8 tensor-core GEMM (built for sm_90)",
                self.name, self.compute_capability.0, self.compute_capability.1
            )));
        }
        check_blocks(op, k, 32)?;
        check_len(op, "fp8 codes", q.len(), n * k)?;
        check_len(op, "fp8 scales", scales.len(), n)?;
        let m = check_problem(op, x, (n, k), bias, y)?;
        let dims = dims(m, n, k)?;
        let mut xq = self.output::<u8>(m * k)?;
        let count = int("n", x.len())?;
        let mut b = self.builder(Kernel::quantize_fp8)?;
        b.arg(x).arg(&mut xq).arg(&input_scale).arg(&count);
        launch(b, elementwise(x.len())?, Kernel::quantize_fp8)?;
        let mut b = self.builder(FP8_GEMM)?;
        b.arg(&xq).arg(&input_scale).arg(q).arg(scales);
        arg_out(&mut b, bias, y, &dims);
        launch(b, tile_grid(m, n, 128)?, FP8_GEMM)
    }
}

fn check_weights(w: &DeviceWeights, n: usize, k: usize) -> Result<()> {
    let op = "cuda linear";
    let groups = |g: usize| check_group(op, g).map(|_| n * groups(k, g));
    match w {
        DeviceWeights::Int8 {
            q,
            scales,
            offsets,
            group,
        } => {
            check_len(op, "int8 codes", q.len(), n * k)?;
            let g = groups(*group)?;
            check_len(op, "int8 scales", scales.len(), g)?;
            offsets
                .as_ref()
                .map_or(Ok(()), |o| check_len(op, "int8 offsets", o.len(), g))
        }
        DeviceWeights::Int4 {
            q,
            scales,
            offsets,
            group,
        } => {
            check_len(op, "int4 codes", q.len(), n * k / 2)?;
            let g = groups(*group)?;
            check_len(op, "int4 scales", scales.len(), g)?;
            offsets
                .as_ref()
                .map_or(Ok(()), |o| check_len(op, "int4 offsets", o.len(), g))
        }
        DeviceWeights::Fp8 { q, scales } => {
            check_len(op, "fp8 codes", q.len(), n * k)?;
            check_len(op, "fp8 scales", scales.len(), n)
        }
        DeviceWeights::Nvfp4 {
            q, block_scales, ..
        } => {
            check_len(op, "nvfp4 codes", q.len(), n * k / 2)?;
            check_len(op, "nvfp4 block scales", block_scales.len(), n * k / 16)
        }
    }
}

#[cfg(test)]
mod tests;
