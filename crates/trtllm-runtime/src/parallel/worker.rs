//! A rank other than 0: it follows rank 0's calls on its shard until told to stop. `trtllm`
//! runs this on every rank but 0 of an `mpirun` job, whatever its command line says, as
//! TensorRT-LLM's worker processes follow the executor's leader.

use std::collections::HashMap;
use std::sync::Arc;

use super::proxy::{self, Msg};
use super::{error, Comm};
use crate::session::fatal;
use crate::{Device, KvPool, LoraWeights, ModelRunner, Result, Session};

/// Follows rank 0 until it stops the job (returns) or the ranks can no longer agree (ends the
/// job through MPI_Abort).
pub fn run(world: Arc<dyn Comm>) -> Result<()> {
    let mut runner: Option<ModelRunner> = None;
    let mut pools: HashMap<u64, KvPool> = HashMap::new();
    let mut loras: HashMap<u64, LoraWeights> = HashMap::new();
    loop {
        let msg = proxy::recv(&*world).unwrap_or_else(|e| fatal(&*world, e));
        let done = match msg {
            Msg::Stop => return Ok(()),
            Msg::Open { dir, device } => {
                (runner, pools, loras) = (None, HashMap::new(), HashMap::new());
                // A rank that cannot open or load its shard says so here; every rank learns it
                // in `Session::runner`'s agreements, and rank 0 reports it.
                let opened = Session::open(&dir);
                if opened.is_err() {
                    super::agree(&*world, true, "open the engine")?;
                }
                match opened.and_then(|s| s.runner(device_here(device))) {
                    Ok(r) => runner = Some(r),
                    Err(e) => eprintln!("error: rank {}: {}: {e}", world.rank(), dir.display()),
                }
                Ok(())
            }
            Msg::NewPool { id, budget } => open(&mut runner)
                .and_then(|r| r.new_pool(&budget))
                .map(|p| drop(pools.insert(id, p))),
            Msg::DropPool { id } => {
                pools.remove(&id);
                Ok(())
            }
            Msg::Forward { pool, chunks } => {
                let r = open(&mut runner);
                r.and_then(|r| r.run_chunks(&chunks, pool_of(&mut pools, pool)?, &loras))
            }
            Msg::Copy { pool, copies } => {
                let r = open(&mut runner);
                r.and_then(|r| r.copy_blocks(pool_of(&mut pools, pool)?, &copies))
            }
            Msg::LoadLora { id, name, dir } => {
                let placed = open(&mut runner).and_then(|r| r.load_lora_from(&name, &dir));
                if let Err(e) = &placed {
                    eprintln!("error: rank {}: {e}", world.rank());
                }
                // Kept only when every rank placed its part: rank 0 reports the failure, and
                // its request fails, not the job.
                let agreed = super::agree(&*world, placed.is_err(), "load a LoRA adapter");
                if let (Ok(weights), Ok(())) = (placed, agreed) {
                    loras.insert(id, weights);
                }
                Ok(())
            }
            Msg::DropLora { id } => {
                loras.remove(&id);
                Ok(())
            }
            // Its own failure is reported here and to rank 0 (which fails the command); the job
            // goes on.
            Msg::Tune { path, budget } => open(&mut runner).map(|r| {
                if let Err(e) = r.tune_in_turn(&*world, &path, budget) {
                    eprintln!("error: rank {}: {e}", world.rank());
                }
            }),
            Msg::Invariant { on } => open(&mut runner).map(|r| r.set_batch_invariant(on)),
        };
        if let Err(e) = done {
            fatal(&*world, e);
        }
    }
}

fn open(runner: &mut Option<ModelRunner>) -> Result<&mut ModelRunner> {
    runner
        .as_mut()
        .ok_or_else(|| error("rank 0 runs an engine this rank could not open"))
}

fn pool_of(pools: &mut HashMap<u64, KvPool>, id: u64) -> Result<&mut KvPool> {
    pools
        .get_mut(&id)
        .ok_or_else(|| error(format!("rank 0 named KV pool {id}, which this rank lacks")))
}

/// Rank 0's device as this rank takes it: the CPU, or the GPU of this rank's place on its node
/// (`mpirun` numbers the ranks of each node from 0) counted from rank 0's.
fn device_here(device: Device) -> Device {
    match device {
        Device::Cpu => Device::Cpu,
        Device::Cuda(n) => {
            let local = [
                "OMPI_COMM_WORLD_LOCAL_RANK",
                "MPI_LOCALRANKID",
                "PMI_LOCAL_RANK",
            ]
            .iter()
            .find_map(|v| std::env::var(v).ok()?.parse::<usize>().ok())
            .unwrap_or(0);
            Device::Cuda(n + local)
        }
    }
}
