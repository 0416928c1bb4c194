//! Running one engine over several processes: how it is split ([`Mapping`], [`Shard`]), the
//! collectives the ranks use ([`Comm`], implemented over MPI with the `mpi` feature), and the
//! proxy that keeps them in step: rank 0 runs the scheduler and every [`crate::ModelRunner`]
//! call that touches the model, and sends each to the other ranks first ([`worker`]), which run
//! the same pass on their shards.

mod mapping;
#[cfg(feature = "mpi")]
pub mod mpi;
pub(crate) mod proxy;
pub mod worker;

use std::sync::{Arc, OnceLock};

pub use mapping::{Mapping, Shard};

use crate::Result;

/// The collectives of a group of ranks. Every rank of the group makes the same calls in the
/// same order; a failed call leaves the group unusable (the caller aborts the job).
pub trait Comm: Send + Sync {
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// `x` becomes its sum over the group.
    fn all_reduce_sum(&self, x: &mut [f32]) -> Result<()>;
    /// Every rank's `part` (`counts[r]` values from rank `r`), concatenated in rank order.
    fn all_gather(&self, part: &[f32], counts: &[usize]) -> Result<Vec<f32>>;
    /// Rank 0's `bytes` (ignored elsewhere), on every rank.
    fn broadcast(&self, bytes: &[u8]) -> Result<Vec<u8>>;
    /// Sends `bytes` to rank `to`, as one of rank 0's calls to the other ranks (`proxy`).
    fn send_call(&self, to: usize, bytes: &[u8]) -> Result<()>;
    /// The next call rank `from` sent, if it has arrived: never blocks, so a rank waiting for
    /// work can sleep between looks (a blocking MPI receive or broadcast spins a core).
    fn try_recv_call(&self, from: usize) -> Result<Option<Vec<u8>>>;
    fn send(&self, to: usize, x: &[f32]) -> Result<()>;
    fn recv(&self, from: usize, x: &mut [f32]) -> Result<()>;
    /// The ranks of this group with the same `color`, as a group of their own (collective:
    /// every rank calls it), numbered by their rank here.
    fn split(&self, color: usize) -> Result<Arc<dyn Comm>>;
    /// Ends every process of the job with `code` (MPI_Abort): what a rank does when the group
    /// can no longer agree on what runs next.
    fn abort(&self, code: i32) -> !;
    /// Time this rank has spent inside calls on this group and the groups split from it.
    fn time(&self) -> CommTime;
}

/// Time spent inside MPI's collectives, by kind (waiting for a slower rank included: a
/// collective ends when the last rank reaches it). NCCL's sums on GPUs are not in it.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct CommTime {
    /// Sums of partial products (after O and down) and of the vocabulary-split embeddings.
    pub all_reduce: std::time::Duration,
    /// Logits of the vocabulary-split head.
    pub all_gather: std::time::Duration,
    /// Activations between pipeline stages, logits to rank 0.
    pub send_recv: std::time::Duration,
    /// Rank 0's calls to the other ranks (each step's batch).
    pub broadcast: std::time::Duration,
    pub calls: u64,
}

impl CommTime {
    pub fn total(&self) -> std::time::Duration {
        self.all_reduce + self.all_gather + self.send_recv + self.broadcast
    }
}

static WORLD: OnceLock<Arc<dyn Comm>> = OnceLock::new();

/// Whether a process launcher (`mpirun`, a PMI/PMIx manager) started this process.
pub fn launched_by_mpirun() -> bool {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"]
        .iter()
        .any(|v| std::env::var_os(v).is_some())
}

/// Makes `world` the process's ranks (once: MPI is initialized once per process).
pub fn set_world(world: Arc<dyn Comm>) {
    let _ = WORLD.set(world);
}

/// The ranks this process runs among, when started by `mpirun` (and set by [`set_world`]).
pub fn world() -> Option<Arc<dyn Comm>> {
    WORLD.get().cloned()
}

/// The groups one rank of an engine talks to.
#[derive(Clone)]
pub(crate) struct Groups {
    pub shard: Shard,
    /// The ranks sharing this rank's layers (sum of partial products, gathered logits).
    pub tp: Arc<dyn Comm>,
    /// Every rank: activations between stages, logits to rank 0 (apart from `world`, which
    /// carries rank 0's calls, so that neither waits behind the other).
    pub pipe: Arc<dyn Comm>,
    pub world: Arc<dyn Comm>,
}

impl Groups {
    /// Collective over `world`: each rank's TP group is the ranks of its stage.
    pub fn new(world: Arc<dyn Comm>, shard: Shard) -> Result<Self> {
        let tp = world.split(shard.pp_rank)?;
        let pipe = world.split(0)?;
        Ok(Self {
            shard,
            tp,
            pipe,
            world,
        })
    }

    /// The world rank of TP rank `tp_rank` of stage `pp_rank`.
    pub fn rank_of(&self, pp_rank: usize, tp_rank: usize) -> usize {
        pp_rank * self.shard.mapping.tp_size + tp_rank
    }
}

/// Every rank says whether its part of a collective step failed: an error on each rank that did
/// not fail when another did (a rank that failed has its own error to report).
pub(crate) fn agree(world: &dyn Comm, failed: bool, what: &str) -> Result<()> {
    let mut flag = [f32::from(u8::from(failed))];
    world.all_reduce_sum(&mut flag)?;
    match flag[0] > 0.0 && !failed {
        true => Err(error(format!(
            "another rank could not {what} (its error is on its standard error)"
        ))),
        false => Ok(()),
    }
}

/// Tells the other ranks of this process's job that it is over (from rank 0, once, before
/// MPI is finalized); nothing without a job.
pub fn stop_workers() -> Result<()> {
    match world() {
        Some(w) if w.rank() == 0 && w.size() > 1 => proxy::send(&*w, &proxy::Msg::Stop),
        _ => Ok(()),
    }
}

/// An error of a collective or of a rank's part of a parallel run.
pub(crate) fn error(message: impl Into<String>) -> crate::RuntimeError {
    crate::RuntimeError::Parallel(message.into())
}
