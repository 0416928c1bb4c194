//! CUDA kernels (the PTX of `kernels/*.cu`, embedded at build time) launched through cudarc.
//!
//! cudarc loads the driver with dlopen, so this module builds everywhere; [`CudaDevice::new`]
//! reports a missing driver or GPU as [`KernelError::Cuda`] instead of the loader's panic.
//! Launchers check shapes like the CPU kernels do and leave the work queued on the device's
//! stream; reading a result back ([`CudaDevice::download`]) waits for it.

mod attention;
mod linear;
mod lora;
mod matrix;
mod nccl;
mod ops;
#[cfg(test)]
mod tests;

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, OnceLock};

use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaFunction, CudaStream, DeviceRepr, ValidAsZeroBits};
use cudarc::nvrtc::Ptx;

pub use attention::{AttentionBatch, DeviceKv, KvSide};
pub use cudarc::driver::CudaSlice;
pub use linear::{DeviceWeights, Half};
pub use lora::{DeviceLoraMat, DeviceLoraRows};
pub use matrix::{DeviceData, DeviceMatrix};
pub use nccl::{nccl_available, nccl_unique_id, Nccl};
pub use ops::DeviceRopeFreqs;

use crate::{KernelError, Result};

/// One `kernels/NAME.cu` compiled for `compute_ARCH`.
pub(crate) struct PtxModule {
    pub name: &'static str,
    pub arch: u32,
    pub ptx: &'static str,
}

include!(concat!(env!("OUT_DIR"), "/ptx_modules.rs"));

fn cuda_err(what: &str) -> impl Fn(cudarc::driver::DriverError) -> KernelError + '_ {
    move |e| KernelError::Cuda(format!("{what}: {e}"))
}

/// A GPU with every kernel loaded, and the stream they run on.
pub struct CudaDevice {
    stream: Arc<CudaStream>,
    functions: HashMap<String, CudaFunction>,
    /// cuBLAS for dense GEMMs, created on first use (the library is only needed then).
    blas: OnceLock<CudaBlas>,
    name: String,
    compute_capability: (i32, i32),
    /// Batch invariance ([`Self::set_batch_invariant`]).
    invariant: bool,
}

impl CudaDevice {
    /// Opens GPU `ordinal` and loads, per kernel source, the PTX of the highest architecture the
    /// GPU runs.
    pub fn new(ordinal: usize) -> Result<Self> {
        // SAFETY: only probes whether the driver library can be opened.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(KernelError::Cuda(
                "no CUDA device: the NVIDIA driver library (libcuda.so) is not installed".into(),
            ));
        }
        let count = CudaContext::device_count().map_err(cuda_err("no CUDA device"))?;
        if ordinal >= count.max(0) as usize {
            return Err(KernelError::Cuda(format!(
                "no CUDA device {ordinal}: the driver sees {count}"
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(cuda_err("opening the CUDA device"))?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(cuda_err("compute capability"))?;
        let name = ctx.name().map_err(cuda_err("device name"))?;
        let cc = (major * 10 + minor) as u32;
        let mut functions = HashMap::new();
        let sources: BTreeSet<&str> = MODULES.iter().map(|m| m.name).collect();
        for source in sources {
            let module = MODULES
                .iter()
                .filter(|m| m.name == source && m.arch <= cc)
                .max_by_key(|m| m.arch)
                .ok_or_else(|| {
                    KernelError::Cuda(format!(
                        "{name} (compute capability {major}.{minor}) is older than every \
                         architecture {source}.cu was built for (sm_80 and newer)"
                    ))
                })?;
            let loaded = ctx
                .load_module(Ptx::from_src(module.ptx))
                .map_err(cuda_err(source))?;
            for f in ptx_entries(module.ptx) {
                let func = loaded.load_function(f).map_err(cuda_err(f))?;
                functions.insert(f.to_string(), func);
            }
        }
        Ok(Self {
            stream: ctx.default_stream(),
            functions,
            blas: OnceLock::new(),
            name,
            compute_capability: (major, minor),
            invariant: false,
        })
    }

    /// Batch invariance: every product and attention row is summed in an order that depends on
    /// its own row alone, never on how many rows the batch has or where a prefill chunk ends.
    /// Linear layers take the matrix-vector kernels at every row count (a warp per output, the
    /// same lanes and warp sum for any `m`) in place of cuBLAS and the tiled GEMMs, FP8 layers
    /// round activations through E4M3 there instead of the tensor-core GEMM, and attention
    /// takes the row kernel for prefill chunks too. W8A8 stays on its own kernels: both sum in
    /// exact int32. Prefill pays for it (weights are read once per four rows).
    pub fn set_batch_invariant(&mut self, on: bool) {
        self.invariant = on;
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn compute_capability(&self) -> (i32, i32) {
        self.compute_capability
    }

    pub fn upload<T: DeviceRepr>(&self, host: &[T]) -> Result<CudaSlice<T>> {
        self.stream
            .clone_htod(host)
            .map_err(cuda_err("copy to device"))
    }

    /// A device copy of `d`.
    pub fn copy<T: DeviceRepr>(&self, d: &CudaSlice<T>) -> Result<CudaSlice<T>> {
        self.stream.clone_dtod(d).map_err(cuda_err("device copy"))
    }

    /// A buffer for a kernel that writes every element, without the memset [`Self::zeros`] pays
    /// for (a launch per buffer).
    pub fn output<T: DeviceRepr>(&self, n: usize) -> Result<CudaSlice<T>> {
        // SAFETY: device memory is never read by the host before a kernel fills it; callers pass
        // the buffer only as an output every element of which the kernel writes.
        unsafe { self.stream.alloc(n) }.map_err(cuda_err("device allocation"))
    }

    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, n: usize) -> Result<CudaSlice<T>> {
        self.stream
            .alloc_zeros(n)
            .map_err(cuda_err("device allocation"))
    }

    /// Waits for the queued work and copies `d` back.
    pub fn download<T: DeviceRepr>(&self, d: &CudaSlice<T>) -> Result<Vec<T>> {
        self.stream
            .clone_dtoh(d)
            .map_err(cuda_err("copy from device"))
    }

    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(cuda_err("synchronize"))
    }

    fn blas(&self) -> Result<&CudaBlas> {
        if let Some(b) = self.blas.get() {
            return Ok(b);
        }
        // SAFETY: only probes whether the library can be opened.
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err(KernelError::Cuda(
                "cuBLAS (libcublas.so) is not installed; dense layers need it".into(),
            ));
        }
        let blas = CudaBlas::new(self.stream.clone())
            .map_err(|e| KernelError::Cuda(format!("creating a cuBLAS handle: {e:?}")))?;
        Ok(self.blas.get_or_init(|| blas))
    }

    /// A kernel the embedded PTX defines but this device did not load (an sm_90-only kernel on
    /// an older GPU) is an error.
    fn function(&self, kernel: Kernel) -> Result<&CudaFunction> {
        let name = kernel.name();
        self.functions.get(name).ok_or_else(|| {
            KernelError::Cuda(format!("kernel {name} is not loaded on {}", self.name))
        })
    }
}

/// The kernel names a PTX module defines (`.visible .entry NAME(`).
fn ptx_entries(ptx: &str) -> impl Iterator<Item = &str> {
    ptx.lines().filter_map(|l| {
        l.trim_start()
            .strip_prefix(".visible .entry ")
            .map(|rest| rest.split('(').next().unwrap_or(rest).trim())
    })
}
