//! LoRA adapters in the executor. A request names one ([`LoraRequest`]); `submit` reads and
//! checks it on the caller's thread through a host cache (the engine's `max_cpu_loras`, least
//! recently used dropped first), so a new adapter never stalls the engine loop; the loop keeps
//! at most `max_loras` adapters on the runner's device, never dropping one a running request
//! uses, and the scheduler never runs more distinct adapters at once.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use trtllm_builder::runtime::{LoraAdapter, LoraWeights, ModelRunner, RuntimeError};

use crate::Result;

/// An adapter a request runs with (TensorRT-LLM's and vLLM's `LoRARequest`): `id` names it for
/// caching and for the prefix cache (requests of different ids never share KV blocks), `path`
/// is a PEFT adapter directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoraRequest {
    pub name: String,
    pub id: u64,
    pub path: PathBuf,
}

/// A request's adapter, read and checked.
#[derive(Clone, Debug)]
pub(crate) struct RequestLora {
    pub id: u64,
    pub adapter: Arc<LoraAdapter>,
}

/// Adapters read on the host, most recently used last.
pub(crate) struct HostLoras {
    max: usize,
    entries: Vec<(LoraRequest, Arc<LoraAdapter>)>,
}

impl HostLoras {
    pub fn new(max: usize) -> Self {
        Self {
            max: max.max(1),
            entries: Vec::new(),
        }
    }

    /// The cached adapter of `req`, if read before. An id already taken by another name or
    /// path is an error: the id is what the KV cache keys on.
    pub fn cached(&mut self, req: &LoraRequest) -> Result<Option<Arc<LoraAdapter>>> {
        let Some(i) = self.entries.iter().position(|(r, _)| r.id == req.id) else {
            return Ok(None);
        };
        let (known, _) = &self.entries[i];
        if known != req {
            return Err(RuntimeError::Lora {
                adapter: req.name.clone(),
                reason: format!(
                    "id {} is adapter {} at {}; an id names one adapter",
                    req.id,
                    known.name,
                    known.path.display()
                ),
            }
            .into());
        }
        let entry = self.entries.remove(i);
        let adapter = entry.1.clone();
        self.entries.push(entry);
        Ok(Some(adapter))
    }

    pub fn insert(&mut self, req: LoraRequest, adapter: Arc<LoraAdapter>) {
        self.entries.retain(|(r, _)| r.id != req.id);
        if self.entries.len() >= self.max {
            self.entries.remove(0);
        }
        self.entries.push((req, adapter));
    }
}

/// The adapters on the runner's device, each with its last use.
pub(crate) struct ResidentLoras {
    max: usize,
    tick: u64,
    slots: HashMap<u64, (LoraWeights, u64)>,
}

impl ResidentLoras {
    pub fn new(max: usize) -> Self {
        Self {
            max: max.max(1),
            tick: 0,
            slots: HashMap::new(),
        }
    }

    pub fn get(&self, id: u64) -> Option<&LoraWeights> {
        self.slots.get(&id).map(|(w, _)| w)
    }

    /// Places `lora` on the device unless it is there, first dropping the least recently used
    /// adapters no request in `in_use` runs with, down to the limit.
    pub fn ensure(
        &mut self,
        runner: &ModelRunner,
        lora: &RequestLora,
        in_use: &[u64],
    ) -> std::result::Result<(), RuntimeError> {
        self.tick += 1;
        if let Some(slot) = self.slots.get_mut(&lora.id) {
            slot.1 = self.tick;
            return Ok(());
        }
        while self.slots.len() >= self.max {
            let idle = self
                .slots
                .iter()
                .filter(|(id, _)| !in_use.contains(id))
                .min_by_key(|(_, (_, used))| *used)
                .map(|(&id, _)| id);
            match idle {
                Some(id) => self.slots.remove(&id),
                None => break,
            };
        }
        let weights = runner.load_lora(&lora.adapter)?;
        self.slots.insert(lora.id, (weights, self.tick));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(id: u64, name: &str) -> LoraRequest {
        LoraRequest {
            name: name.into(),
            id,
            path: format!("/adapters/{name}").into(),
        }
    }

    fn adapter(name: &str) -> Arc<LoraAdapter> {
        Arc::new(LoraAdapter {
            name: name.into(),
            rank: 1,
            layers: Vec::new(),
            dir: None,
        })
    }

    #[test]
    fn host_cache_drops_the_least_recently_used_and_keeps_ids_to_one_adapter() {
        let mut c = HostLoras::new(2);
        c.insert(req(1, "a"), adapter("a"));
        c.insert(req(2, "b"), adapter("b"));
        assert!(c.cached(&req(1, "a")).unwrap().is_some()); // a is now the most recent
        c.insert(req(3, "c"), adapter("c"));
        assert!(c.cached(&req(2, "b")).unwrap().is_none());
        assert!(c.cached(&req(1, "a")).unwrap().is_some());
        let e = c.cached(&req(1, "other")).unwrap_err().to_string();
        assert!(e.contains("id 1 is adapter a"), "{e}");
    }
}
