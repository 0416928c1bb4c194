//! What rank 0 tells the other ranks, in order, so that they make the same calls on their
//! shards: open the engine, make or drop a KV pool, run a pass, copy blocks, load an adapter,
//! tune, stop. Each message is sent to each rank (JSON: a step's chunks are a few kilobytes),
//! point to point so that a rank with nothing to do can wait without spinning a core.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{error, Comm};
use crate::kv_cache::{BlockCopy, BlockId, KvBudget};
use crate::model::{LogitsMode, SeqChunk};
use crate::{Device, Result};

#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Msg {
    /// Open the engine in `dir` and make a runner on `device` (closing any open one).
    Open {
        dir: PathBuf,
        device: Device,
    },
    NewPool {
        id: u64,
        budget: KvBudget,
    },
    DropPool {
        id: u64,
    },
    Forward {
        pool: u64,
        chunks: Vec<Chunk>,
    },
    Copy {
        pool: u64,
        copies: Vec<BlockCopy>,
    },
    Invariant {
        on: bool,
    },
    /// Read the LoRA adapter in `dir` and keep this rank's part of it under `id`; every rank
    /// then agrees on whether all could.
    LoadLora {
        id: u64,
        name: String,
        dir: PathBuf,
    },
    DropLora {
        id: u64,
    },
    /// Tune this rank's shard in turn (`ModelRunner::tune_in_turn`) through the timing cache
    /// file at `path`.
    Tune {
        path: PathBuf,
        budget: std::time::Duration,
    },
    /// The job is over: return from [`super::worker::run`].
    Stop,
}

/// A [`SeqChunk`] as it travels.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Chunk {
    pub tokens: Vec<u32>,
    pub past: usize,
    pub blocks: Vec<Vec<BlockId>>,
    pub logits: LogitsMode,
    /// The id of the chunk's adapter as rank 0 loaded it ([`RemoteLora`]).
    pub lora: Option<u64>,
}

impl Chunk {
    pub fn of(c: &SeqChunk<'_>) -> Self {
        Self {
            tokens: c.tokens.to_vec(),
            past: c.past,
            blocks: c.blocks.iter().map(|b| b.to_vec()).collect(),
            logits: c.logits,
            lora: c.lora.map(|w| w.id()),
        }
    }
}

/// Sends `msg` from rank 0 to every other rank.
pub(crate) fn send(world: &dyn Comm, msg: &Msg) -> Result<()> {
    let bytes = serde_json::to_vec(msg).map_err(|e| error(e.to_string()))?;
    (1..world.size()).try_for_each(|rank| world.send_call(rank, &bytes))
}

/// How long a rank waiting for rank 0 keeps looking without a pause: a serving job's next step
/// comes within milliseconds, and is answered at once.
const SPIN: Duration = Duration::from_millis(20);
/// Past [`SPIN`], the pause between looks grows with the quiet spell (a hundredth of it) up to
/// this: the first call after it waits at most that long, and an idle job's other ranks use
/// next to no CPU instead of a core each.
const MAX_NAP: Duration = Duration::from_millis(2);

/// The next message from rank 0.
pub(crate) fn recv(world: &dyn Comm) -> Result<Msg> {
    let waiting = Instant::now();
    let bytes = loop {
        if let Some(bytes) = world.try_recv_call(0)? {
            break bytes;
        }
        let quiet = waiting.elapsed();
        match quiet < SPIN {
            true => std::hint::spin_loop(),
            false => std::thread::sleep((quiet / 100).min(MAX_NAP)),
        }
    };
    serde_json::from_slice(&bytes).map_err(|e| error(format!("a message from rank 0: {e}")))
}

/// A KV pool of rank 0 whose twins the other ranks keep under `id` (dropped with it).
pub(crate) struct RemotePool {
    pub id: u64,
    world: Arc<dyn Comm>,
}

impl RemotePool {
    /// Tells the other ranks to make their twin of a pool of `budget`.
    pub fn new(world: Arc<dyn Comm>, budget: &KvBudget) -> Result<Self> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        let budget = budget.clone();
        send(&*world, &Msg::NewPool { id, budget })?;
        Ok(Self { id, world })
    }
}

impl Drop for RemotePool {
    fn drop(&mut self) {
        send_or_abort(&*self.world, &Msg::DropPool { id: self.id });
    }
}

/// [`send`] where failing cannot be returned (a drop): the ranks can no longer follow rank 0,
/// so nothing can run after this.
fn send_or_abort(world: &dyn Comm, msg: &Msg) {
    if let Err(e) = send(world, msg) {
        eprintln!("error: {e}");
        world.abort(1);
    }
}

/// A LoRA adapter rank 0 placed, whose parts the other ranks keep under `id` (dropped with it).
pub(crate) struct RemoteLora {
    world: Arc<dyn Comm>,
    id: u64,
}

impl RemoteLora {
    /// Tells the other ranks to read the adapter `name` from `dir` and keep their parts of it
    /// under `id`; the caller then agrees with them on whether every rank could.
    pub fn new(world: Arc<dyn Comm>, id: u64, name: &str, dir: PathBuf) -> Result<Self> {
        let name = name.to_string();
        send(&*world, &Msg::LoadLora { id, name, dir })?;
        Ok(Self { world, id })
    }
}

impl Drop for RemoteLora {
    fn drop(&mut self) {
        send_or_abort(&*self.world, &Msg::DropLora { id: self.id });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_travel_as_json_and_come_back_the_same() {
        let tables: Vec<Vec<BlockId>> = vec![vec![3, 4], vec![7]];
        let refs: Vec<&[BlockId]> = tables.iter().map(|t| &t[..]).collect();
        let c = SeqChunk {
            tokens: &[1, 2, 3],
            past: 5,
            blocks: &refs,
            logits: LogitsMode::Last,
            lora: None,
        };
        let msg = Msg::Forward {
            pool: 9,
            chunks: vec![Chunk::of(&c)],
        };
        let back: Msg = serde_json::from_slice(&serde_json::to_vec(&msg).unwrap()).unwrap();
        let Msg::Forward { pool, chunks } = back else {
            panic!("{back:?}")
        };
        assert_eq!(
            (pool, &chunks[0].tokens[..], chunks[0].past),
            (9, &[1, 2, 3][..], 5)
        );
        assert_eq!(
            (chunks[0].blocks.clone(), chunks[0].logits),
            (tables, LogitsMode::Last)
        );
    }
}
