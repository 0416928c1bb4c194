//! `trtllm` under `mpirun -np N`: rank 0 runs the command (its scheduler, API and server), and
//! every other rank follows rank 0's calls on its shard of the engine, whatever its command
//! line says, until rank 0's command ends.

use anyhow::{bail, Context, Result};
use trtllm_api::runtime::{parallel, EngineConfig};

use crate::run::ModelArg;

/// `model` is an engine split over ranks, or a checkpoint to build split (`--tp-size`), and this
/// process is not one of a job's: the checkpoint is built (once, here), then this command
/// becomes `mpirun -np N` of itself (the process is replaced, so signals reach mpirun, which
/// passes them on). Returns only when there is nothing to start, or with the reason mpirun
/// could not be started.
pub fn relaunch(model: &ModelArg) -> Result<()> {
    let path = model.path()?;
    let asked = model.mapping()?;
    let mapping = match EngineConfig::read(path) {
        Ok(config) if asked.is_parallel() && asked != config.mapping => bail!(
            "{}: an engine built for tp_size {} × pp_size {}; --tp-size/--pp-size split a \
             checkpoint (rebuild the engine with `trtllm build --tp-size`)",
            path.display(),
            config.mapping.tp_size,
            config.mapping.pp_size
        ),
        Ok(config) => config.mapping,
        // A checkpoint (built by the command), or an engine the command reports as broken.
        Err(_) => asked,
    };
    let n = mapping.world_size;
    if n == 1 || parallel::launched_by_mpirun() || !cfg!(feature = "mpi") {
        return Ok(());
    }
    model.build_now()?;
    let exe = std::env::current_exe().context("locating this trtllm")?;
    eprintln!(
        "{}: the engine is split over {n} ranks: starting them with `mpirun -np {n}`",
        path.display()
    );
    let err = std::os::unix::process::CommandExt::exec(
        std::process::Command::new("mpirun")
            .args(["-np", &n.to_string()])
            .arg(exe)
            .args(std::env::args_os().skip(1))
            // Root may start ranks (containers run as root).
            .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
            .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1"),
    );
    Err(err).context("starting mpirun (Open MPI: openmpi-bin) for the engine's ranks")
}

/// Runs `command` on rank 0 of an `mpirun` job (the other ranks follow it), or alone.
pub fn run(command: impl FnOnce() -> Result<()>) -> Result<()> {
    #[cfg(feature = "mpi")]
    {
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
        if parallel::launched_by_mpirun() && ranks.is_ok_and(|n| n != "1") {
            anyhow::bail!(
                "started by mpirun with several ranks, but this trtllm was built without MPI: \
                 rebuild it with `--features mpi`"
            );
        }
    }
    command()
}
