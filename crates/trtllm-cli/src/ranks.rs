//! `trtllm` under `mpirun -np N`: rank 0 runs the command (its scheduler, API and server), and
//! every other rank follows rank 0's calls on its shard of the engine, whatever its command
//! line says, until rank 0's command ends.

use anyhow::Result;

/// Runs `command` on rank 0 of an `mpirun` job (the other ranks follow it), or alone.
pub fn run(command: impl FnOnce() -> Result<()>) -> Result<()> {
    #[cfg(feature = "mpi")]
    {
        use trtllm_api::runtime::parallel;
        if let Some(world) = parallel::mpi::init()? {
            let result = match world.rank() {
                0 => {
                    let done = command();
                    // Told even when the command failed: the others wait for nothing else.
                    let stopped = parallel::stop_workers();
                    done.and(stopped.map_err(Into::into))
                }
                _ => parallel::worker::run(world).map_err(Into::into),
            };
            parallel::mpi::finalize();
            return result;
        }
    }
    #[cfg(not(feature = "mpi"))]
    {
        let ranks = std::env::var("OMPI_COMM_WORLD_SIZE").or_else(|_| std::env::var("PMI_SIZE"));
        if ranks.is_ok_and(|n| n != "1") {
            anyhow::bail!(
                "started by mpirun with several ranks, but this trtllm was built without MPI: \
                 rebuild it with `--features mpi`"
            );
        }
    }
    command()
}
