//! [`Comm`] over MPI (Open MPI through the `mpi` crate), for jobs started by `mpirun`.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use mpi::collective::SystemOperation;
use mpi::datatype::PartitionMut;
use mpi::topology::{Color, SimpleCommunicator};
use mpi::traits::*;
use mpi::Threading;

use super::{error, launched_by_mpirun, set_world, Comm, CommTime};
use crate::Result;

/// The MPI environment; dropping it finalizes MPI.
static UNIVERSE: Mutex<Option<Universe>> = Mutex::new(None);

struct Universe(#[allow(dead_code)] mpi::environment::Universe);

// SAFETY: MPI was initialized with MPI_THREAD_MULTIPLE (checked in `init`), so its handles may
// be used and dropped from any thread.
unsafe impl Send for Universe {}

/// Initializes MPI when this process runs under `mpirun` and makes its world the process's
/// ([`super::world`]); `None` otherwise (a plain single-process run, no MPI started).
pub fn init() -> Result<Option<Arc<dyn Comm>>> {
    if !launched_by_mpirun() {
        return Ok(None);
    }
    let (universe, threading) = mpi::initialize_with_threading(Threading::Multiple)
        .ok_or_else(|| error("MPI was already initialized"))?;
    if threading < Threading::Multiple {
        return Err(error(format!(
            "this MPI library offers thread support {threading:?}; trtllm needs MPI_THREAD_MULTIPLE"
        )));
    }
    let world: Arc<dyn Comm> = Arc::new(MpiComm::new(universe.world(), Arc::default()));
    *lock(&UNIVERSE) = Some(Universe(universe));
    set_world(world.clone());
    Ok(Some(world))
}

/// Finalizes MPI (every rank, once, at the end of the job).
pub fn finalize() {
    lock(&UNIVERSE).take();
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One communicator; calls on it are made one at a time.
pub struct MpiComm {
    comm: Mutex<Handle>,
    rank: usize,
    size: usize,
    /// Shared with the communicators split from this one.
    time: Arc<Mutex<CommTime>>,
}

struct Handle(SimpleCommunicator);

// SAFETY: under MPI_THREAD_MULTIPLE a communicator may be used from any thread; the mutex
// keeps one call at a time on it, so the ranks see this process's calls in one order.
unsafe impl Send for Handle {}

impl MpiComm {
    fn new(comm: SimpleCommunicator, time: Arc<Mutex<CommTime>>) -> Self {
        Self {
            rank: comm.rank() as usize,
            size: comm.size() as usize,
            comm: Mutex::new(Handle(comm)),
            time,
        }
    }

    /// `f` on the communicator, its time added to `kind`'s.
    fn with<T>(
        &self,
        kind: fn(&mut CommTime) -> &mut Duration,
        f: impl FnOnce(&SimpleCommunicator) -> T,
    ) -> T {
        let comm = lock(&self.comm);
        let start = Instant::now();
        let out = f(&comm.0);
        let mut time = lock(&self.time);
        *kind(&mut time) += start.elapsed();
        time.calls += 1;
        out
    }
}

/// The tag of rank 0's calls to the other ranks, apart from any other message.
const CALL_TAG: i32 = 7;

fn count(n: usize) -> Result<i32> {
    i32::try_from(n).map_err(|_| error(format!("a message of {n} values is too long for MPI")))
}

impl Comm for MpiComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn all_reduce_sum(&self, x: &mut [f32]) -> Result<()> {
        let send = x.to_vec();
        self.with(
            |t| &mut t.all_reduce,
            |c| c.all_reduce_into(&send[..], x, SystemOperation::sum()),
        );
        Ok(())
    }

    fn all_gather(&self, part: &[f32], counts: &[usize]) -> Result<Vec<f32>> {
        if counts.len() != self.size || counts.get(self.rank) != Some(&part.len()) {
            return Err(error(format!(
                "all-gather of {} values with counts {counts:?} on rank {} of {}",
                part.len(),
                self.rank,
                self.size
            )));
        }
        let counts: Vec<i32> = counts.iter().map(|&n| count(n)).collect::<Result<_>>()?;
        let displs: Vec<i32> = counts
            .iter()
            .scan(0i32, |at, &n| Some(std::mem::replace(at, *at + n)))
            .collect();
        let total = counts.iter().map(|&n| n as usize).sum();
        let mut all = vec![0f32; total];
        let mut parts = PartitionMut::new(&mut all[..], counts, displs);
        self.with(
            |t| &mut t.all_gather,
            |c| c.all_gather_varcount_into(part, &mut parts),
        );
        Ok(all)
    }

    fn broadcast(&self, bytes: &[u8]) -> Result<Vec<u8>> {
        self.with(
            |t| &mut t.broadcast,
            |c| {
                let root = c.process_at_rank(0);
                let mut len = bytes.len() as u64;
                root.broadcast_into(&mut len);
                let mut buf = match self.rank {
                    0 => bytes.to_vec(),
                    _ => vec![0u8; len as usize],
                };
                root.broadcast_into(&mut buf[..]);
                Ok(buf)
            },
        )
    }

    fn send_call(&self, to: usize, bytes: &[u8]) -> Result<()> {
        let to = count(to)?;
        self.with(
            |t| &mut t.broadcast,
            |c| c.process_at_rank(to).send_with_tag(bytes, CALL_TAG),
        );
        Ok(())
    }

    fn try_recv_call(&self, from: usize) -> Result<Option<Vec<u8>>> {
        let from = count(from)?;
        Ok(self.with(
            |t| &mut t.broadcast,
            |c| {
                let call = c.process_at_rank(from);
                let arrived = call.immediate_matched_probe_with_tag(CALL_TAG);
                arrived.map(|m| m.matched_receive_vec::<u8>().0)
            },
        ))
    }

    fn send(&self, to: usize, x: &[f32]) -> Result<()> {
        let to = count(to)?;
        self.with(|t| &mut t.send_recv, |c| c.process_at_rank(to).send(x));
        Ok(())
    }

    fn recv(&self, from: usize, x: &mut [f32]) -> Result<()> {
        let src = count(from)?;
        let status = self.with(
            |t| &mut t.send_recv,
            |c| c.process_at_rank(src).receive_into(x),
        );
        let got = status.count(f32::equivalent_datatype()) as usize;
        if got != x.len() {
            return Err(error(format!(
                "rank {from} sent {got} values where {} were expected",
                x.len()
            )));
        }
        Ok(())
    }

    fn split(&self, color: usize) -> Result<Arc<dyn Comm>> {
        let color = Color::with_value(count(color)?);
        let comm = self
            .with(|t| &mut t.broadcast, |c| c.split_by_color(color))
            .ok_or_else(|| error("MPI_Comm_split gave no communicator"))?;
        Ok(Arc::new(MpiComm::new(comm, self.time.clone())))
    }

    fn abort(&self, code: i32) -> ! {
        // Not through the mutex: a thread may hold it, blocked in a call no rank will answer.
        SimpleCommunicator::world().abort(code)
    }

    fn time(&self) -> CommTime {
        *lock(&self.time)
    }
}
