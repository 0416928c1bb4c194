//! Hugging Face config.json (transformers 4 and 5 styles) → [`ModelConfig`].

use std::path::Path;

use serde_json::Value;
use trtllm_runtime::quant::DType;
use trtllm_runtime::{Features, MlpKind, ModelConfig, MoeConfig, NormKind, PositionKind};

use crate::family::{gemma_sliding_layers, Family, GEMMA3_LOCAL_THETA, SUPPORTED};
use crate::hf_rope::{self, RopeDefaults};
use crate::prequant::PreQuant;
use crate::{BuildError, Result};

/// A parsed config: the family, the decoder's config, the stored dtype it names and how its
/// weights are quantized if it was published quantized.
pub struct HfConfig {
    pub family: Family,
    pub model: ModelConfig,
    pub dtype: Option<DType>,
    pub prequant: Option<PreQuant>,
}

pub(crate) struct Fields<'a> {
    v: &'a Value,
    path: &'a Path,
    arch: &'a str,
}

impl Fields<'_> {
    pub(crate) fn get(&self, key: &str) -> Option<&Value> {
        self.v.get(key).filter(|v| !v.is_null())
    }

    pub(crate) fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?
            .ok_or_else(|| BuildError::MissingField {
                path: self.path.to_path_buf(),
                field: key.into(),
                arch: self.arch.into(),
            })
    }

    pub(crate) fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|n| Some(n as usize))
                .ok_or_else(|| self.invalid(key, "expected a non-negative integer")),
        }
    }

    pub(crate) fn f32_or(&self, key: &str, default: f32) -> Result<f32> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .map(|f| f as f32)
                .ok_or_else(|| self.invalid(key, "expected a number")),
        }
    }

    fn bool_or(&self, key: &str, default: bool) -> bool {
        self.get(key).and_then(Value::as_bool).unwrap_or(default)
    }

    fn str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(Value::as_str)
    }

    /// Token ids: one or a list of them (null: none); anything else is an error naming `key`.
    fn ids(&self, key: &str) -> Result<Vec<u32>> {
        let id = |x: &Value| {
            x.as_u64()
                .filter(|&n| n <= u32::MAX as u64)
                .map(|n| n as u32)
                .ok_or_else(|| self.invalid(key, &format!("{x} is not a token id")))
        };
        match self.get(key) {
            Some(Value::Array(a)) => a.iter().map(id).collect(),
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(v) => Ok(vec![id(v)?]),
        }
    }

    pub(crate) fn invalid(&self, key: &str, message: &str) -> BuildError {
        BuildError::InvalidField {
            path: self.path.to_path_buf(),
            field: key.into(),
            message: message.into(),
        }
    }
}

pub fn read(dir: &Path) -> Result<HfConfig> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| BuildError::io(&path, e))?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| BuildError::checkpoint(&path, format!("invalid JSON: {e}")))?;
    parse(&v, &path)
}

pub fn parse(v: &Value, path: &Path) -> Result<HfConfig> {
    let arch = v
        .get("architectures")
        .and_then(|a| a.get(0))
        .and_then(Value::as_str)
        .or_else(|| v.get("model_type").and_then(Value::as_str))
        .ok_or_else(|| BuildError::MissingField {
            path: path.into(),
            field: "architectures".into(),
            arch: "any model".into(),
        })?;
    let family = match arch {
        "LlamaForCausalLM" | "llama" => Family::Llama,
        "MistralForCausalLM" | "mistral" => Family::Mistral,
        "Qwen2ForCausalLM" | "qwen2" => Family::Qwen2,
        "Qwen3ForCausalLM" | "qwen3" => Family::Qwen3,
        "Phi3ForCausalLM" | "phi3" => Family::Phi3,
        "Gemma2ForCausalLM" | "gemma2" => Family::Gemma2,
        "Gemma3ForCausalLM" | "gemma3_text" => Family::Gemma3,
        "MixtralForCausalLM" | "mixtral" => Family::Mixtral,
        "Qwen3MoeForCausalLM" | "qwen3_moe" => Family::Qwen3Moe,
        "GPT2LMHeadModel" | "gpt2" => Family::Gpt2,
        other => {
            return Err(BuildError::UnsupportedArchitecture {
                path: path.into(),
                arch: other.into(),
                supported: SUPPORTED,
            })
        }
    };
    let f = Fields { v, path, arch };
    let dtype = match f.str("dtype").or_else(|| f.str("torch_dtype")) {
        Some(s) => Some(DType::parse(s).map_err(|e| f.invalid("dtype", &e.to_string()))?),
        None => None,
    };
    let model = match family {
        Family::Gpt2 => gpt2(&f, arch)?,
        _ => llama_like(&f, arch, family)?,
    };
    model
        .validate()
        .map_err(|e| BuildError::checkpoint(path, e.to_string()))?;
    Ok(HfConfig {
        family,
        model,
        dtype,
        prequant: PreQuant::parse(v, path)?,
    })
}

fn llama_like(f: &Fields, arch: &str, family: Family) -> Result<ModelConfig> {
    let gemma = family.is_gemma();
    // Gemma names it hidden_activation (and used hidden_act for it in early configs).
    let (key, act) = match f.str("hidden_activation") {
        Some(a) => ("hidden_activation", a),
        None => {
            let default = if gemma { "gelu_pytorch_tanh" } else { "silu" };
            ("hidden_act", f.str("hidden_act").unwrap_or(default))
        }
    };
    let mlp = match act {
        "silu" if !gemma => MlpKind::GatedSilu,
        "gelu_pytorch_tanh" | "gelu_new" if gemma => MlpKind::GatedGeluTanh,
        _ => {
            let expected = if gemma { "gelu_pytorch_tanh" } else { "silu" };
            return Err(f.invalid(
                key,
                &format!("'{act}' is not supported for {arch} (expected {expected})"),
            ));
        }
    };
    let hidden = f.usize("hidden_size")?;
    let heads = f.usize("num_attention_heads")?;
    let head_dim = f.opt_usize("head_dim")?.unwrap_or(hidden / heads.max(1));
    let rope = hf_rope::read(
        f,
        head_dim,
        RopeDefaults {
            theta: match family {
                Family::Qwen2 | Family::Qwen3 | Family::Qwen3Moe | Family::Gemma3 => 1_000_000.0,
                _ => 10_000.0,
            },
            local_theta: (family == Family::Gemma3).then_some(GEMMA3_LOCAL_THETA),
        },
    )?;
    let num_layers = f.usize("num_hidden_layers")?;
    if num_layers > ModelConfig::MAX_LAYERS {
        // Checked here as well as in `validate`: per-layer tables below are sized by it.
        return Err(f.invalid(
            "num_hidden_layers",
            &format!(
                "{num_layers} is out of range (at most {})",
                ModelConfig::MAX_LAYERS
            ),
        ));
    }
    let (sliding_window, sliding_layers) = sliding(f, family, num_layers)?;
    Ok(ModelConfig {
        architecture: arch.into(),
        vocab_size: f.usize("vocab_size")?,
        hidden_size: hidden,
        intermediate_size: f.usize("intermediate_size")?,
        num_layers,
        num_heads: heads,
        num_kv_heads: f.opt_usize("num_key_value_heads")?.unwrap_or(heads),
        head_dim,
        max_position_embeddings: f.usize("max_position_embeddings")?,
        norm: NormKind::RmsNorm,
        norm_eps: f.f32_or("rms_norm_eps", 1e-6)?,
        mlp,
        position: rope.position,
        tie_word_embeddings: f.bool_or("tie_word_embeddings", gemma),
        features: Features {
            qk_norm: family.has_qk_norm(),
            sliding_window,
            sliding_layers,
            attn_logit_softcap: opt_f32(f, "attn_logit_softcapping")?,
            final_logit_softcap: opt_f32(f, "final_logit_softcapping")?,
            query_pre_attn_scalar: opt_f32(f, "query_pre_attn_scalar")?,
            embed_scale: gemma.then(|| (hidden as f32).sqrt()),
            post_norms: gemma,
            moe: moe(f, family, num_layers)?,
            local_rope: rope.local,
        },
        bos_token_id: f.ids("bos_token_id")?.first().copied(),
        eos_token_ids: f.ids("eos_token_id")?,
        stage_layers: None,
    })
}

/// Mixtral's experts in every layer; Qwen3-MoE's in every `decoder_sparse_step`-th layer not
/// in `mlp_only_layers`, each of `moe_intermediate_size`.
fn moe(f: &Fields, family: Family, layers: usize) -> Result<Option<MoeConfig>> {
    Ok(match family {
        Family::Mixtral => Some(MoeConfig {
            num_experts: f.usize("num_local_experts")?,
            top_k: f.usize("num_experts_per_tok")?,
            normalize_top_k: true,
            expert_intermediate_size: None,
            dense_layers: Vec::new(),
        }),
        Family::Qwen3Moe => {
            let step = f.opt_usize("decoder_sparse_step")?.unwrap_or(1).max(1);
            let dense_only = f.ids("mlp_only_layers")?;
            Some(MoeConfig {
                // transformers 5 writes Mixtral's name for it.
                num_experts: match f.opt_usize("num_local_experts")? {
                    Some(n) => n,
                    None => f.usize("num_experts")?,
                },
                top_k: f.usize("num_experts_per_tok")?,
                normalize_top_k: f.bool_or("norm_topk_prob", false),
                expert_intermediate_size: Some(f.usize("moe_intermediate_size")?),
                dense_layers: (0..layers)
                    .map(|i| dense_only.contains(&(i as u32)) || (i + 1) % step != 0)
                    .collect(),
            })
        }
        _ => None,
    })
}

fn opt_f32(f: &Fields, key: &str) -> Result<Option<f32>> {
    match f.get(key) {
        None => Ok(None),
        Some(v) => match v.as_f64() {
            Some(x) if x > 0.0 => Ok(Some(x as f32)),
            _ => Err(f.invalid(key, "expected a positive number")),
        },
    }
}

/// The sliding window and the layers it applies to: transformers 5's `layer_types`
/// (`sliding_attention` / `full_attention`), else Qwen2's `use_sliding_window` from layer
/// `max_window_layers` on, else Gemma's `sliding_window_pattern`, else every layer (Mistral).
fn sliding(f: &Fields, family: Family, layers: usize) -> Result<(Option<usize>, Vec<bool>)> {
    let qwen = matches!(family, Family::Qwen2 | Family::Qwen3 | Family::Qwen3Moe);
    let Some(window) = f.opt_usize("sliding_window")? else {
        return Ok((None, Vec::new()));
    };
    if qwen && !f.bool_or("use_sliding_window", false) {
        return Ok((None, Vec::new()));
    }
    let flags = match f.get("layer_types") {
        Some(Value::Array(types)) => types
            .iter()
            .map(|t| match t.as_str() {
                Some("sliding_attention") => Ok(true),
                Some("full_attention") => Ok(false),
                _ => Err(f.invalid(
                    "layer_types",
                    &format!("{t} is not supported (sliding_attention, full_attention)"),
                )),
            })
            .collect::<Result<Vec<_>>>()?,
        _ if qwen => {
            let first = f.opt_usize("max_window_layers")?.unwrap_or(0);
            (0..layers).map(|i| i >= first).collect()
        }
        // Older Gemma configs: every pattern-th layer global (Gemma 2 alternates).
        _ if family.is_gemma() => {
            let pattern = f.opt_usize("sliding_window_pattern")?;
            gemma_sliding_layers(layers, pattern.unwrap_or(family.gemma_pattern()))
        }
        _ => Vec::new(),
    };
    Ok((Some(window), flags))
}

fn gpt2(f: &Fields, arch: &str) -> Result<ModelConfig> {
    let act = f.str("activation_function").unwrap_or("gelu_new");
    if !matches!(act, "gelu_new" | "gelu_pytorch_tanh") {
        return Err(f.invalid(
            "activation_function",
            &format!("'{act}' is not supported (expected gelu_new)"),
        ));
    }
    let hidden = f.usize("n_embd")?;
    let heads = f.usize("n_head")?;
    Ok(ModelConfig {
        architecture: arch.into(),
        vocab_size: f.usize("vocab_size")?,
        hidden_size: hidden,
        intermediate_size: f.opt_usize("n_inner")?.unwrap_or(4 * hidden),
        num_layers: f.usize("n_layer")?,
        num_heads: heads,
        num_kv_heads: heads,
        head_dim: hidden / heads.max(1),
        max_position_embeddings: f.usize("n_positions")?,
        norm: NormKind::LayerNorm,
        norm_eps: f.f32_or("layer_norm_epsilon", 1e-5)?,
        mlp: MlpKind::GeluTanh,
        position: PositionKind::Learned,
        tie_word_embeddings: f.bool_or("tie_word_embeddings", true),
        features: Features::default(),
        bos_token_id: f.ids("bos_token_id")?.first().copied(),
        eos_token_ids: f.ids("eos_token_id")?,
        stage_layers: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use trtllm_runtime::RopeScaling;

    fn llama() -> Value {
        json!({"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 160,
               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
               "max_position_embeddings": 256, "vocab_size": 1024, "eos_token_id": [2, 5],
               "rope_parameters": {"rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0,
                 "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}})
    }

    #[test]
    fn transformers5_rope_parameters_and_eos_lists() {
        let c = parse(&llama(), Path::new("config.json")).unwrap().model;
        assert_eq!(c.eos_token_ids, vec![2, 5]);
        assert_eq!(c.head_dim, 16);
        match c.position {
            PositionKind::Rope {
                theta,
                scaling: RopeScaling::Llama3 { factor, .. },
                ..
            } => {
                assert_eq!((theta, factor), (500000.0, 8.0))
            }
            other => panic!("{other:?}"),
        }
    }

    /// Found by the fuzzer: MoE and window tables are sized by the layer count, which must be
    /// checked before them (2^32 layers aborted on a 4 GB allocation).
    #[test]
    fn a_layer_count_past_the_bound_is_refused_before_tables_are_sized() {
        let fixture = include_str!("../../../tests/fixtures/tiny-qwen3-moe/config.json");
        let mut v: Value = serde_json::from_str(fixture).unwrap();
        v["num_hidden_layers"] = json!(1u64 << 32);
        let e = parse(&v, Path::new("config.json"))
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("num_hidden_layers") && e.contains("at most 1024"),
            "{e}"
        );
    }

    #[test]
    fn missing_and_unknown_fields_are_named() {
        let mut v = llama();
        v.as_object_mut().unwrap().remove("num_attention_heads");
        let e = parse(&v, Path::new("x/config.json"))
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("num_attention_heads") && e.contains("x/config.json"),
            "{e}"
        );
        let e = parse(
            &json!({"architectures": ["FooForCausalLM"]}),
            Path::new("c"),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(
            e.contains("FooForCausalLM") && e.contains("supported"),
            "{e}"
        );
    }
}
