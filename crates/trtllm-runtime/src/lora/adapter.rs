//! PEFT LoRA adapters (`adapter_config.json` + `adapter_model.safetensors`, as `peft`'s
//! `save_pretrained` writes them) read and checked against an engine's model: every factor is
//! mapped onto the engine's fused linear modules, so the forward pass adds one `(x·Aᵀ)·Bᵀ` per
//! module and adapter, whichever checkpoint projections the adapter targeted.
//!
//! A fused module stacks the A of each targeted projection (`rank` rows each) and places each B
//! in that projection's output rows, zero elsewhere: q/k/v in `qkv`, gate/up in the gated MLP's
//! input, and Phi-3's own fused `qkv_proj` / `gate_up_proj` over the whole module. The scaling
//! (`lora_alpha / r`, or `/ √r` with rsLoRA) is folded into B.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;

use serde::Deserialize;
use trtllm_quant::kernels::{LoraBlock, LoraDims};

use crate::{EngineConfig, MlpKind, ModelConfig, Result, RuntimeError};

/// The engine's linear modules an adapter can change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum LoraModule {
    Qkv,
    O,
    /// The MLP's input: fused gate and up for gated MLPs.
    Up,
    Down,
}

impl LoraModule {
    pub const ALL: [LoraModule; 4] = [Self::Qkv, Self::O, Self::Up, Self::Down];
}

/// One module's update `Δy = (x·Aᵀ)·Bᵀ`: A is `[rank × inputs]`, B `[outputs × rank]`
/// (scaling included), both row-major f32; B is zero outside `blocks` (one per targeted
/// projection of a fused module).
#[derive(Clone, Debug)]
pub struct LoraFactors {
    pub a: Vec<f32>,
    pub b: Vec<f32>,
    pub rank: usize,
    pub inputs: usize,
    pub outputs: usize,
    pub blocks: Vec<LoraBlock>,
}

impl LoraFactors {
    /// Bᵀ, `[rank × outputs]`: the layout the kernels read B in.
    pub fn b_transposed(&self) -> Vec<f32> {
        let mut bt = vec![0f32; self.b.len()];
        for (o, row) in self.b.chunks_exact(self.rank.max(1)).enumerate() {
            for (r, &v) in row.iter().enumerate() {
                bt[r * self.outputs + o] = v;
            }
        }
        bt
    }

    pub fn dims(&self) -> LoraDims {
        LoraDims {
            inputs: self.inputs,
            outputs: self.outputs,
        }
    }
}

/// A LoRA adapter on the host, checked against one model: per layer, the factors of each
/// module it changes.
#[derive(Clone, Debug)]
pub struct LoraAdapter {
    pub name: String,
    /// PEFT's `r`.
    pub rank: usize,
    pub layers: Vec<BTreeMap<LoraModule, LoraFactors>>,
    /// The directory it was read from: where the other ranks of a split engine read it too.
    pub dir: Option<std::path::PathBuf>,
}

/// The fields of `adapter_config.json` this reader understands; any other setting that would
/// change the arithmetic is refused by name rather than ignored.
#[derive(Deserialize)]
struct AdapterConfig {
    peft_type: Option<String>,
    r: usize,
    lora_alpha: f32,
    #[serde(default)]
    use_rslora: bool,
    target_modules: serde_json::Value,
    #[serde(default)]
    fan_in_fan_out: bool,
    #[serde(default)]
    use_dora: bool,
    bias: Option<String>,
    #[serde(default)]
    rank_pattern: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    alpha_pattern: BTreeMap<String, serde_json::Value>,
    modules_to_save: Option<serde_json::Value>,
    layers_to_transform: Option<serde_json::Value>,
}

impl LoraAdapter {
    /// Reads the adapter in `dir` for the engine of `engine` (its model, its `max_lora_rank`):
    /// what the executor and the runner both read.
    pub fn for_engine(name: &str, dir: &Path, engine: &EngineConfig) -> Result<Self> {
        Self::load(name, dir, &engine.model, engine.build.max_lora_rank)
    }

    /// Reads the adapter in `dir` for `cfg`, refusing ranks above `max_rank`. Every error names
    /// the adapter, and the tensor or setting at fault.
    pub fn load(name: &str, dir: &Path, cfg: &ModelConfig, max_rank: usize) -> Result<Self> {
        let err = |reason: String| RuntimeError::Lora {
            adapter: name.to_string(),
            reason,
        };
        let config_path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|e| {
            err(format!(
                "{}: {e} (a PEFT adapter directory holds adapter_config.json)",
                config_path.display()
            ))
        })?;
        let config: AdapterConfig = serde_json::from_str(&text)
            .map_err(|e| err(format!("{}: {e}", config_path.display())))?;
        let scaling = check_config(&config, max_rank).map_err(err)?;
        let weights_path = dir.join("adapter_model.safetensors");
        let bytes = std::fs::read(&weights_path)
            .map_err(|e| err(format!("{}: {e}", weights_path.display())))?;
        let tensors = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| err(format!("{}: {e}", weights_path.display())))?;
        let mut pairs: BTreeMap<(usize, String), [Option<Tensor>; 2]> = BTreeMap::new();
        for (key, view) in tensors.tensors() {
            let (layer, module, which) = parse_key(&key).map_err(err)?;
            let t = Tensor::of(&key, &view).map_err(err)?;
            pairs.entry((layer, module)).or_default()[which] = Some(t);
        }
        let mut layers = vec![BTreeMap::new(); cfg.num_layers];
        let mut parts: BTreeMap<(usize, LoraModule), Vec<Part>> = BTreeMap::new();
        for ((layer, module), [a, b]) in pairs {
            let what = format!("layers.{layer}.{module}");
            let (Some(a), Some(b)) = (a, b) else {
                return Err(err(format!("{what} has only one of lora_A and lora_B")));
            };
            if layer >= cfg.num_layers {
                return Err(err(format!(
                    "{what}: the model has {} layers",
                    cfg.num_layers
                )));
            }
            let target =
                Target::of(cfg, layer, &module).map_err(|r| err(format!("{what}: {r}")))?;
            a.expect(&what, "lora_A", [config.r, target.inputs])
                .map_err(err)?;
            b.expect(&what, "lora_B", [target.rows.len(), config.r])
                .map_err(err)?;
            parts
                .entry((layer, target.module))
                .or_default()
                .push(Part { target, a, b });
        }
        for ((layer, module), parts) in parts {
            let factors = fuse(cfg, layer, module, &parts, (config.r, scaling));
            layers[layer].insert(module, factors);
        }
        if layers.iter().all(BTreeMap::is_empty) {
            return Err(err(format!(
                "{} holds no LoRA factors",
                weights_path.display()
            )));
        }
        Ok(Self {
            name: name.to_string(),
            rank: config.r,
            layers,
            dir: Some(dir.to_path_buf()),
        })
    }
}

impl LoraAdapter {
    /// Checks an adapter (read for some engine) against `cfg` before a runner places it: rank,
    /// layer count and every factor's shape.
    pub fn check(&self, cfg: &ModelConfig, max_rank: usize) -> Result<()> {
        let err = |reason: String| RuntimeError::Lora {
            adapter: self.name.clone(),
            reason,
        };
        if self.rank > max_rank {
            return Err(err(format!(
                "rank {} is over this engine's limit of {max_rank} (trtllm build --max-lora-rank)",
                self.rank
            )));
        }
        if self.layers.len() != cfg.num_layers {
            return Err(err(format!(
                "{} layers, this model has {}",
                self.layers.len(),
                cfg.num_layers
            )));
        }
        for (i, modules) in self.layers.iter().enumerate() {
            for (&m, f) in modules {
                let (inputs, outputs) = module_dims(cfg, i, m);
                if (f.inputs, f.outputs) != (inputs, outputs) || f.a.len() != f.rank * inputs {
                    return Err(err(format!(
                        "layers.{i} {m:?}: {} → {} features, this model's module is {inputs} → {outputs}",
                        f.inputs, f.outputs
                    )));
                }
                if m >= LoraModule::Up && cfg.moe(i).is_some() {
                    return Err(err(format!(
                        "layers.{i}: LoRA on a mixture of experts' MLP is not supported"
                    )));
                }
            }
        }
        Ok(())
    }
}

/// An engine module's input and output widths in layer `layer`.
fn module_dims(cfg: &ModelConfig, layer: usize, m: LoraModule) -> (usize, usize) {
    let h = cfg.hidden_size;
    match m {
        LoraModule::Qkv => (h, cfg.qkv_dim()),
        LoraModule::O => (cfg.q_dim(), h),
        LoraModule::Up => (h, cfg.mlp_in(layer).1),
        LoraModule::Down => (cfg.mlp_inter(layer), h),
    }
}

/// The adapter's scaling, or what in its config this reader does not apply.
fn check_config(c: &AdapterConfig, max_rank: usize) -> std::result::Result<f32, String> {
    if let Some(t) = c.peft_type.as_deref().filter(|t| *t != "LORA") {
        return Err(format!("peft_type {t}: only LORA adapters are supported"));
    }
    if c.r == 0 || c.r > max_rank {
        return Err(format!(
            "rank {} is over this engine's limit of {max_rank} (trtllm build --max-lora-rank)",
            c.r
        ));
    }
    let refused = [
        (c.use_dora, "use_dora (DoRA)"),
        (c.fan_in_fan_out, "fan_in_fan_out (GPT-2's Conv1D layers)"),
        (
            c.bias.as_deref().is_some_and(|b| b != "none"),
            "bias other than \"none\"",
        ),
        (
            !c.rank_pattern.is_empty(),
            "rank_pattern (per-module ranks)",
        ),
        (
            !c.alpha_pattern.is_empty(),
            "alpha_pattern (per-module alphas)",
        ),
        (
            c.modules_to_save.as_ref().is_some_and(|m| !m.is_null()),
            "modules_to_save (fully trained modules)",
        ),
        (
            c.layers_to_transform.as_ref().is_some_and(|m| !m.is_null()),
            "layers_to_transform",
        ),
    ];
    if let Some((_, what)) = refused.iter().find(|(on, _)| *on) {
        return Err(format!("{what} is not supported"));
    }
    if !c.target_modules.is_array() {
        return Err(
            "target_modules must be a list of module names (a regex is not supported)".into(),
        );
    }
    let r = c.r as f32;
    Ok(match c.use_rslora {
        true => c.lora_alpha / r.sqrt(),
        false => c.lora_alpha / r,
    })
}

/// `(layer, module, 0 for A / 1 for B)` of a PEFT tensor name such as
/// `base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`.
fn parse_key(key: &str) -> std::result::Result<(usize, String, usize), String> {
    let bad = || {
        format!(
            "tensor {key}: not a LoRA factor of a decoder layer's projection this engine adapts"
        )
    };
    let rest = key.split_once("layers.").ok_or_else(bad)?.1;
    let (layer, rest) = rest.split_once('.').ok_or_else(bad)?;
    let layer: usize = layer.parse().map_err(|_| bad())?;
    let rest = rest.strip_suffix(".weight").ok_or_else(bad)?;
    let (path, which) = rest.rsplit_once('.').ok_or_else(bad)?;
    let which = match which {
        "lora_A" => 0,
        "lora_B" => 1,
        _ => return Err(bad()),
    };
    let module = path.rsplit('.').next().ok_or_else(bad)?;
    Ok((layer, module.to_string(), which))
}

/// Where a checkpoint projection lands in the engine: a module, its rows there, its input width.
struct Target {
    module: LoraModule,
    rows: Range<usize>,
    inputs: usize,
}

impl Target {
    fn of(cfg: &ModelConfig, layer: usize, name: &str) -> std::result::Result<Self, String> {
        let (h, q, kv) = (cfg.hidden_size, cfg.q_dim(), cfg.kv_dim());
        let inter = cfg.mlp_inter(layer);
        let gated = cfg.mlp != MlpKind::GeluTanh;
        let mlp = matches!(name, "gate_proj" | "up_proj" | "gate_up_proj" | "down_proj");
        if mlp && cfg.moe(layer).is_some() {
            return Err("LoRA on a mixture of experts' MLP is not supported".into());
        }
        let (module, rows, inputs) = match name {
            "q_proj" => (LoraModule::Qkv, 0..q, h),
            "k_proj" => (LoraModule::Qkv, q..q + kv, h),
            "v_proj" => (LoraModule::Qkv, q + kv..q + 2 * kv, h),
            "qkv_proj" => (LoraModule::Qkv, 0..q + 2 * kv, h),
            "o_proj" => (LoraModule::O, 0..h, q),
            "gate_proj" if gated => (LoraModule::Up, 0..inter, h),
            "up_proj" if gated => (LoraModule::Up, inter..2 * inter, h),
            "up_proj" => (LoraModule::Up, 0..inter, h),
            "gate_up_proj" if gated => (LoraModule::Up, 0..2 * inter, h),
            "down_proj" => (LoraModule::Down, 0..h, inter),
            _ => {
                return Err(format!(
                    "module {name} is not one this model's engine applies LoRA to (q_proj, \
                     k_proj, v_proj, qkv_proj, o_proj, gate_proj, up_proj, gate_up_proj, down_proj)"
                ))
            }
        };
        Ok(Self {
            module,
            rows,
            inputs,
        })
    }
}

/// A factor tensor read as f32, `[rows, cols]`.
struct Tensor {
    shape: Vec<usize>,
    data: Vec<f32>,
}

impl Tensor {
    fn of(key: &str, v: &safetensors::tensor::TensorView<'_>) -> std::result::Result<Self, String> {
        use safetensors::Dtype;
        let raw = v.data();
        let data: Vec<f32> = match v.dtype() {
            Dtype::F32 => raw
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::BF16 => raw
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::F16 => raw
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            d => {
                return Err(format!(
                    "tensor {key}: dtype {d:?} (supported: F32, BF16, F16)"
                ))
            }
        };
        if let Some(i) = data.iter().position(|x| !x.is_finite()) {
            return Err(format!("tensor {key}: non-finite value at element {i}"));
        }
        Ok(Self {
            shape: v.shape().to_vec(),
            data,
        })
    }

    fn expect(
        &self,
        what: &str,
        which: &str,
        shape: [usize; 2],
    ) -> std::result::Result<(), String> {
        match self.shape == shape {
            true => Ok(()),
            false => Err(format!(
                "{what}.{which}: shape {:?}, this model needs {shape:?}",
                self.shape
            )),
        }
    }
}

/// One checkpoint projection's factors and where they land.
struct Part {
    target: Target,
    a: Tensor,
    b: Tensor,
}

/// The parts of one engine module stacked: A's one under another, each B (scaled) in its rows
/// and its own rank's columns.
fn fuse(
    cfg: &ModelConfig,
    layer: usize,
    module: LoraModule,
    parts: &[Part],
    (r, scaling): (usize, f32),
) -> LoraFactors {
    let (inputs, outputs) = module_dims(cfg, layer, module);
    let rank = r * parts.len();
    let mut a = Vec::with_capacity(rank * inputs);
    let mut b = vec![0f32; outputs * rank];
    let mut blocks = Vec::with_capacity(parts.len());
    for (p, part) in parts.iter().enumerate() {
        blocks.push(LoraBlock {
            outputs: part.target.rows.clone(),
            ranks: p * r..(p + 1) * r,
        });
        a.extend_from_slice(&part.a.data);
        for (i, row) in part.target.rows.clone().enumerate() {
            for c in 0..r {
                b[row * rank + p * r + c] = part.b.data[i * r + c] * scaling;
            }
        }
    }
    LoraFactors {
        a,
        b,
        rank,
        inputs,
        outputs,
        blocks,
    }
}
