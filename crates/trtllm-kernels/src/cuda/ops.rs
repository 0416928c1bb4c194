//! Typed launchers, one per kernel family, with the CPU kernels' shape checks.

use cudarc::driver::{CudaSlice, LaunchArgs, LaunchConfig, PushKernelArg};

use super::{cuda_err, CudaDevice, Kernel};
use crate::error::check_len;
use crate::{KernelError, Result};

/// Threads per block of the row-wise kernels (norms, softmax, sampling).
pub(super) const ROW_THREADS: u32 = 256;

pub(super) fn int(what: &'static str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| KernelError::OutOfRange {
        op: "cuda launch",
        what,
        index: v,
        limit: i32::MAX as usize,
    })
}

pub(super) fn grid(blocks: usize, threads: u32) -> Result<LaunchConfig> {
    Ok(LaunchConfig {
        grid_dim: (int("grid", blocks)? as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// One step's rotary frequencies (`cpu::RopeFreqs`) on the device, checked on the host before
/// upload (every token's set exists), so the kernel never reads past the table.
pub struct DeviceRopeFreqs {
    sets: CudaSlice<u32>,
    table: CudaSlice<f32>,
    half: usize,
    scale: f32,
}

impl CudaDevice {
    pub(super) fn builder(&self, kernel: Kernel) -> Result<LaunchArgs<'_>> {
        Ok(self.stream.launch_builder(self.function(kernel)?))
    }

    /// `out = rms_norm(x)` per row; `residual`, when given, first gets `x` added and is normed.
    pub fn rms_norm(
        &self,
        x: &CudaSlice<f32>,
        residual: Option<&mut CudaSlice<f32>>,
        w: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
        eps: f32,
    ) -> Result<()> {
        let cols = w.len();
        let rows = check_rows("rms_norm", x.len(), cols)?;
        check_len("rms_norm", "out", out.len(), x.len())?;
        let c = int("cols", cols)?;
        let cfg = grid(rows, ROW_THREADS)?;
        match residual {
            None => {
                let mut b = self.builder(Kernel::rms_norm_f32)?;
                b.arg(x).arg(w).arg(out).arg(&c).arg(&eps);
                launch(b, cfg, Kernel::rms_norm_f32)
            }
            Some(r) => {
                check_len("rms_norm", "residual", r.len(), x.len())?;
                let mut b = self.builder(Kernel::add_rms_norm_f32)?;
                b.arg(x).arg(r).arg(w).arg(out).arg(&c).arg(&eps);
                launch(b, cfg, Kernel::add_rms_norm_f32)
            }
        }
    }

    /// LayerNorm, optionally fused with the residual add like [`Self::rms_norm`].
    pub fn layer_norm(
        &self,
        x: &CudaSlice<f32>,
        residual: Option<&mut CudaSlice<f32>>,
        (w, bias): (&CudaSlice<f32>, &CudaSlice<f32>),
        out: &mut CudaSlice<f32>,
        eps: f32,
    ) -> Result<()> {
        let cols = w.len();
        check_len("layer_norm", "bias", bias.len(), cols)?;
        let rows = check_rows("layer_norm", x.len(), cols)?;
        check_len("layer_norm", "out", out.len(), x.len())?;
        let c = int("cols", cols)?;
        let cfg = grid(rows, ROW_THREADS)?;
        match residual {
            None => {
                let mut b = self.builder(Kernel::layer_norm_f32)?;
                b.arg(x).arg(w).arg(bias).arg(out).arg(&c).arg(&eps);
                launch(b, cfg, Kernel::layer_norm_f32)
            }
            Some(r) => {
                check_len("layer_norm", "residual", r.len(), x.len())?;
                let mut b = self.builder(Kernel::add_layer_norm_f32)?;
                b.arg(x).arg(r).arg(w).arg(bias).arg(out).arg(&c).arg(&eps);
                launch(b, cfg, Kernel::add_layer_norm_f32)
            }
        }
    }

    /// One step's rotary frequencies on the device.
    pub fn upload_rope(
        &self,
        f: &crate::cpu::RopeFreqs,
        head_dim: usize,
    ) -> Result<DeviceRopeFreqs> {
        f.check(f.set_of_token.len(), head_dim)?;
        Ok(DeviceRopeFreqs {
            sets: self.upload(&f.set_of_token)?,
            table: self.upload(&f.table)?,
            half: f.half,
            scale: f.scale,
        })
    }

    /// Rotates `x` (`[tokens × n_heads × head_dim]`) in place, token `t` at `positions[t]` by
    /// its frequency set in `freqs`.
    pub fn rope(
        &self,
        x: &mut CudaSlice<f32>,
        positions: &CudaSlice<i32>,
        freqs: &DeviceRopeFreqs,
        n_heads: usize,
        head_dim: usize,
    ) -> Result<()> {
        check_len("rope", "x", x.len(), positions.len() * n_heads * head_dim)?;
        check_len("rope", "frequency sets", freqs.sets.len(), positions.len())?;
        if 2 * freqs.half > head_dim {
            return Err(KernelError::ShapeMismatch {
                op: "rope",
                what: "rotary dim (≤ head_dim)",
                expected: head_dim,
                got: 2 * freqs.half,
            });
        }
        let (h, d, half) = (
            int("heads", n_heads)?,
            int("head_dim", head_dim)?,
            int("half", freqs.half)?,
        );
        let cfg = LaunchConfig {
            grid_dim: (int("tokens", positions.len())? as u32, h as u32, 1),
            block_dim: (64, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.builder(Kernel::rope_f32)?;
        b.arg(x)
            .arg(positions)
            .arg(&freqs.sets)
            .arg(&freqs.table)
            .arg(&h)
            .arg(&d)
            .arg(&half)
            .arg(&freqs.scale);
        launch(b, cfg, Kernel::rope_f32)
    }

    /// `out[rows × inter] = silu(gate) · up` from `gate_up[rows × 2·inter]`.
    pub fn silu_mul(
        &self,
        gate_up: &CudaSlice<f32>,
        rows: usize,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        self.gated(Kernel::silu_mul_f32, gate_up, rows, out)
    }

    /// As [`Self::silu_mul`] with GELU-tanh on the gate (GeGLU).
    pub fn gelu_tanh_mul(
        &self,
        gate_up: &CudaSlice<f32>,
        rows: usize,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        self.gated(Kernel::gelu_tanh_mul_f32, gate_up, rows, out)
    }

    fn gated(
        &self,
        kernel: Kernel,
        gate_up: &CudaSlice<f32>,
        rows: usize,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let name = kernel.name();
        check_len(name, "gate_up", gate_up.len(), 2 * out.len())?;
        let inter = check_rows(name, out.len(), rows.max(1))?;
        let (r, i) = (int("rows", rows)?, int("inter", inter)?);
        let cfg = elementwise(out.len())?;
        let mut b = self.builder(kernel)?;
        b.arg(gate_up).arg(out).arg(&r).arg(&i);
        launch(b, cfg, kernel)
    }

    pub fn gelu_tanh(&self, x: &mut CudaSlice<f32>) -> Result<()> {
        let (n, cfg) = (int("n", x.len())?, elementwise(x.len())?);
        let mut b = self.builder(Kernel::gelu_tanh_f32)?;
        b.arg(x).arg(&n);
        launch(b, cfg, Kernel::gelu_tanh_f32)
    }

    /// `out[rows[i]] += w[i] · x[i]` for each row `i` of `x` (`width` wide). The rows must be
    /// distinct (threads add without atomics) and inside `out`.
    pub fn add_rows_scaled(
        &self,
        out: &mut CudaSlice<f32>,
        x: &CudaSlice<f32>,
        (rows, w): (&CudaSlice<u32>, &CudaSlice<f32>),
        width: usize,
    ) -> Result<()> {
        let n = rows.len();
        check_len("add_rows_scaled", "x", x.len(), n * width)?;
        check_len("add_rows_scaled", "weights", w.len(), n)?;
        check_rows("add_rows_scaled", out.len(), width.max(1))?;
        if n == 0 {
            return Ok(());
        }
        let (ni, wi) = (int("rows", n)?, int("width", width)?);
        let cfg = elementwise(x.len())?;
        let mut b = self.builder(Kernel::add_rows_scaled_f32)?;
        b.arg(x).arg(rows).arg(w).arg(out).arg(&ni).arg(&wi);
        launch(b, cfg, Kernel::add_rows_scaled_f32)
    }

    /// `x += y`.
    pub fn add(&self, x: &mut CudaSlice<f32>, y: &CudaSlice<f32>) -> Result<()> {
        check_len("add", "y", y.len(), x.len())?;
        let (n, cfg) = (int("n", x.len())?, elementwise(x.len())?);
        let mut b = self.builder(Kernel::add_f32)?;
        b.arg(x).arg(y).arg(&n);
        launch(b, cfg, Kernel::add_f32)
    }

    /// `x[r][c] *= s[c]` for rows of `s.len()` values (a layer's pre_quant_scale).
    pub fn scale_cols(&self, x: &mut CudaSlice<f32>, s: &CudaSlice<f32>) -> Result<()> {
        let rows = check_rows("scale_cols", x.len(), s.len())?;
        let (r, c, cfg) = (
            int("rows", rows)?,
            int("cols", s.len())?,
            elementwise(x.len())?,
        );
        let mut b = self.builder(Kernel::scale_cols_f32)?;
        b.arg(x).arg(s).arg(&r).arg(&c);
        launch(b, cfg, Kernel::scale_cols_f32)
    }

    /// `out[r][j] = x[r][perm[j]]` (act-order GPTQ weights read their input in this order). The
    /// indices are trusted to lie below `perm.len()` (checked where the engine is loaded).
    pub fn gather_cols(
        &self,
        x: &CudaSlice<f32>,
        perm: &CudaSlice<u32>,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let rows = check_rows("gather_cols", x.len(), perm.len())?;
        check_len("gather_cols", "out", out.len(), x.len())?;
        let (r, c, cfg) = (
            int("rows", rows)?,
            int("cols", perm.len())?,
            elementwise(x.len())?,
        );
        let mut b = self.builder(Kernel::gather_cols_f32)?;
        b.arg(x).arg(perm).arg(out).arg(&r).arg(&c);
        launch(b, cfg, Kernel::gather_cols_f32)
    }

    /// `x = e4m3(x / scale) · scale`: activations through FP8 with a static scale.
    pub fn fp8_qdq(&self, x: &mut CudaSlice<f32>, scale: f32) -> Result<()> {
        let (n, cfg) = (int("n", x.len())?, elementwise(x.len())?);
        let mut b = self.builder(Kernel::fp8_qdq_f32)?;
        b.arg(x).arg(&scale).arg(&n);
        launch(b, cfg, Kernel::fp8_qdq_f32)
    }

    /// `dst[r] = src[r][col0..col0 + cols]` for `src_cols`-wide rows, `cols = dst.len() / rows`.
    pub fn copy_cols(
        &self,
        (src, src_cols): (&CudaSlice<f32>, usize),
        col0: usize,
        dst: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let rows = check_rows("copy_cols", src.len(), src_cols)?;
        let cols = check_rows("copy_cols", dst.len(), rows.max(1))?;
        if col0 + cols > src_cols {
            return Err(KernelError::OutOfRange {
                op: "copy_cols",
                what: "last column",
                index: col0 + cols,
                limit: src_cols + 1,
            });
        }
        let (r, sc, c0, c) = (
            int("rows", rows)?,
            int("src_cols", src_cols)?,
            int("col0", col0)?,
            int("cols", cols)?,
        );
        let cfg = elementwise(dst.len())?;
        let mut b = self.builder(Kernel::copy_cols_f32)?;
        b.arg(src).arg(dst).arg(&r).arg(&sc).arg(&c0).arg(&c);
        launch(b, cfg, Kernel::copy_cols_f32)
    }

    /// `out[t] = table[ids[t]]` for an f32 table of `cols`-wide rows.
    pub fn embedding(
        &self,
        table: &CudaSlice<f32>,
        ids: &CudaSlice<u32>,
        cols: usize,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let vocab = check_rows("embedding", table.len(), cols)?;
        check_len("embedding", "out", out.len(), ids.len() * cols)?;
        let (v, c) = (int("vocab", vocab)?, int("cols", cols)?);
        let mut b = self.builder(Kernel::embedding_f32)?;
        b.arg(table).arg(ids).arg(out).arg(&v).arg(&c);
        launch(b, grid(ids.len(), 128)?, Kernel::embedding_f32)
    }

    /// Row-wise softmax of `cols`-wide rows, in place.
    pub fn softmax(&self, x: &mut CudaSlice<f32>, cols: usize) -> Result<()> {
        let rows = check_rows("softmax", x.len(), cols)?;
        let c = int("cols", cols)?;
        let mut b = self.builder(Kernel::softmax_f32)?;
        b.arg(x).arg(&c);
        launch(b, grid(rows, ROW_THREADS)?, Kernel::softmax_f32)
    }
}

/// Grid-stride elementwise kernels: 256 threads, at most 4096 blocks.
pub(super) fn elementwise(n: usize) -> Result<LaunchConfig> {
    grid(n.div_ceil(256).clamp(1, 4096), 256)
}

pub(super) fn launch(mut b: LaunchArgs<'_>, cfg: LaunchConfig, kernel: Kernel) -> Result<()> {
    // SAFETY: every launcher checks its buffers' lengths against the kernel's indexing and
    // pushes the arguments in the kernel's order and types.
    unsafe { b.launch(cfg) }
        .map(|_| ())
        .map_err(cuda_err(kernel.name()))
}

/// Rows of a `cols`-wide buffer of `len` values.
pub(super) fn check_rows(op: &'static str, len: usize, cols: usize) -> Result<usize> {
    if cols == 0 || !len.is_multiple_of(cols) {
        return Err(KernelError::ShapeMismatch {
            op,
            what: "buffer (whole rows)",
            expected: len.next_multiple_of(cols.max(1)),
            got: len,
        });
    }
    Ok(len / cols)
}
