//! NCCL between the GPUs of an engine split over processes (one rank each): the sum of a
//! tensor-parallel layer's partial outputs in device memory, on the device's stream. The group
//! is bootstrapped by the caller, which sends one rank's [`nccl_unique_id`] to the others (over
//! MPI, as TensorRT-LLM does).

use std::sync::Mutex;

use cudarc::driver::CudaSlice;
use cudarc::nccl::{Comm, Id, ReduceOp};

use super::CudaDevice;
use crate::{KernelError, Result};

fn nccl_err(what: &str) -> impl Fn(cudarc::nccl::result::NcclError) -> KernelError + '_ {
    move |e| KernelError::Cuda(format!("NCCL {what}: error {:?}", e.0))
}

/// Whether NCCL (`libnccl.so`) can be loaded here.
pub fn nccl_available() -> bool {
    // SAFETY: only tries to dlopen the library by its usual names.
    unsafe { cudarc::nccl::sys::is_culib_present() }
}

/// A new group's id, made on one rank and given to every rank's [`CudaDevice::nccl`].
pub fn nccl_unique_id() -> Result<[u8; 128]> {
    let id = Id::new().map_err(nccl_err("unique id"))?;
    Ok(id.internal().map(|c| c as u8))
}

/// One rank's member of an NCCL group.
pub struct Nccl {
    comm: Mutex<Comm>,
}

// SAFETY: an NCCL communicator may be used from any thread as long as calls on it do not
// overlap; the mutex serializes them.
unsafe impl Send for Nccl {}
// SAFETY: as above: every use goes through the mutex.
unsafe impl Sync for Nccl {}

impl CudaDevice {
    /// This GPU as rank `rank` of the `size` ranks of group `id` (every rank calls it at once).
    pub fn nccl(&self, rank: usize, size: usize, id: &[u8; 128]) -> Result<Nccl> {
        let id = Id::uninit(id.map(|b| b as std::ffi::c_char));
        let comm = Comm::from_rank(self.stream.clone(), rank, size, id)
            .map_err(nccl_err("communicator"))?;
        Ok(Nccl {
            comm: Mutex::new(comm),
        })
    }
}

impl Nccl {
    /// `x` becomes its sum over the group.
    pub fn all_reduce_sum(&self, x: &mut CudaSlice<f32>) -> Result<()> {
        let comm = self.comm.lock().unwrap_or_else(|p| p.into_inner());
        comm.all_reduce_in_place(x, &ReduceOp::Sum)
            .map_err(nccl_err("all-reduce"))?;
        Ok(())
    }
}
