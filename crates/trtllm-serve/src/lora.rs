//! LoRA adapters served by name, as vLLM serves them: those of `--lora-modules` and those loaded
//! at run time through `/v1/load_lora_adapter`. A request whose `model` names one runs with it;
//! the base model's names run none. Each load gets an id of its own, so a name unloaded and
//! loaded again from another directory never shares cached KV blocks with its old self.

use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::State;
use serde::Deserialize;
use trtllm_api::LoRARequest;

use crate::handlers::JsonBody;
use crate::state::AppState;
use crate::ServeError;

/// The adapters being served.
#[derive(Default)]
pub struct Adapters {
    next_id: u64,
    served: Vec<LoRARequest>,
}

impl Adapters {
    pub fn new(modules: &[(String, PathBuf)]) -> Self {
        let mut a = Self::default();
        for (name, path) in modules {
            let lora = a.next(name, path.clone());
            a.served.push(lora);
        }
        a
    }

    pub fn get(&self, name: &str) -> Option<LoRARequest> {
        self.served.iter().find(|l| l.name == name).cloned()
    }

    pub fn list(&self) -> Vec<LoRARequest> {
        self.served.clone()
    }

    fn next(&mut self, name: &str, path: PathBuf) -> LoRARequest {
        self.next_id += 1;
        LoRARequest {
            name: name.to_string(),
            id: self.next_id,
            path,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadRequest {
    lora_name: String,
    lora_path: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnloadRequest {
    lora_name: String,
}

/// `POST /v1/load_lora_adapter`: reads and checks the adapter against the engine (on a blocking
/// thread), then serves it under its name.
pub async fn load(
    State(st): State<Arc<AppState>>,
    JsonBody(req): JsonBody<LoadRequest>,
) -> Result<String, ServeError> {
    let name = req.lora_name.trim().to_string();
    if name.is_empty() {
        return Err(ServeError::bad("lora_name is empty", Some("lora_name")));
    }
    let names = &st.config.served_model_names;
    taken(names, &st.adapters(), &name)?;
    let lora = st.adapters().next(&name, req.lora_path);
    let check = {
        let (st, lora) = (st.clone(), lora.clone());
        tokio::task::spawn_blocking(move || st.llm.executor().preload_lora(&lora))
    };
    check
        .await
        .map_err(|e| ServeError::Internal(format!("adapter check: {e}")))??;
    // Checked again, under the lock it is added with: another load of the name may have
    // finished while this one was read.
    let mut adapters = st.adapters();
    taken(names, &adapters, &name)?;
    adapters.served.push(lora);
    Ok(format!(
        "Success: LoRA adapter '{name}' added successfully."
    ))
}

/// An error if `name` already names the base model or an adapter.
fn taken(served: &[String], adapters: &Adapters, name: &str) -> Result<(), ServeError> {
    match served.iter().any(|n| n == name) || adapters.get(name).is_some() {
        true => Err(ServeError::bad(
            format!("The lora adapter '{name}' has already been loaded."),
            Some("lora_name"),
        )),
        false => Ok(()),
    }
}

/// `POST /v1/unload_lora_adapter`: requests already running with the adapter finish with it.
pub async fn unload(
    State(st): State<Arc<AppState>>,
    JsonBody(req): JsonBody<UnloadRequest>,
) -> Result<String, ServeError> {
    let mut adapters = st.adapters();
    let before = adapters.served.len();
    adapters.served.retain(|l| l.name != req.lora_name);
    if adapters.served.len() == before {
        return Err(ServeError::NotFound(format!(
            "The lora adapter '{}' cannot be found.",
            req.lora_name
        )));
    }
    Ok(format!(
        "Success: LoRA adapter '{}' removed successfully.",
        req.lora_name
    ))
}
