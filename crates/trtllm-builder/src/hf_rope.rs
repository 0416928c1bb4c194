//! RoPE settings of a Hugging Face config: transformers 5's `rope_parameters` (per layer type
//! for Gemma 3), transformers 4's `rope_theta` + `rope_scaling`, and every scaling type.

use serde_json::{Map, Value};
use trtllm_runtime::{LocalRope, PositionKind, RopeScaling};

use crate::hf_config::Fields;
use crate::Result;

pub const SUPPORTED_SCALING: &str = "default, linear, dynamic, yarn, longrope, llama3";

/// What the model-wide settings are called where the checkpoint has per-layer-type ones.
const GLOBAL: &str = "full_attention";
const LOCAL: &str = "sliding_attention";

/// The global RoPE and, where sliding-window layers have their own (Gemma 3), theirs.
pub struct Rope {
    pub position: PositionKind,
    pub local: Option<LocalRope>,
}

/// Defaults a family brings when the config is silent.
pub struct RopeDefaults {
    pub theta: f32,
    pub local_theta: Option<f32>,
}

pub fn read(f: &Fields, head_dim: usize, defaults: RopeDefaults) -> Result<Rope> {
    let params = f.get("rope_parameters").or_else(|| f.get("rope_scaling"));
    let per_type = params
        .and_then(Value::as_object)
        .filter(|p| p.contains_key(GLOBAL));
    let (global, local) = match per_type {
        Some(p) => (p.get(GLOBAL), p.get(LOCAL)),
        None => (params, None),
    };
    let global_ctx = Ctx {
        f,
        p: global.and_then(Value::as_object),
        key: if per_type.is_some() {
            "rope_parameters.full_attention"
        } else {
            "rope_scaling"
        },
    };
    let partial = match global_ctx.num("partial_rotary_factor")? {
        Some(p) => p,
        None => f.f32_or("partial_rotary_factor", 1.0)?,
    };
    let rotary_dim = ((head_dim as f32 * partial) as usize) & !1;
    let theta = match global_ctx.num("rope_theta")? {
        Some(t) => t,
        None => f.f32_or("rope_theta", defaults.theta)?,
    };
    let position = PositionKind::Rope {
        theta,
        rotary_dim,
        scaling: global_ctx.scaling(rotary_dim)?,
    };
    let local = match (defaults.local_theta, local) {
        (None, None) => None,
        (default, local) => {
            let ctx = Ctx {
                f,
                p: local.and_then(Value::as_object),
                key: "rope_parameters.sliding_attention",
            };
            let theta = match ctx.num("rope_theta")? {
                Some(t) => t,
                None => f.f32_or("rope_local_base_freq", default.unwrap_or(theta))?,
            };
            Some(LocalRope {
                theta,
                scaling: ctx.scaling(rotary_dim)?,
            })
        }
    };
    Ok(Rope { position, local })
}

/// One set of RoPE parameters and where it sits in the config, for error messages.
struct Ctx<'a> {
    f: &'a Fields<'a>,
    p: Option<&'a Map<String, Value>>,
    key: &'static str,
}

impl Ctx<'_> {
    fn get(&self, k: &str) -> Option<&Value> {
        self.p.and_then(|p| p.get(k)).filter(|v| !v.is_null())
    }

    fn num(&self, k: &str) -> Result<Option<f32>> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v.as_f64().map(|x| Some(x as f32)).ok_or_else(|| {
                self.f
                    .invalid(&format!("{}.{k}", self.key), "expected a number")
            }),
        }
    }

    fn req(&self, k: &str) -> Result<f32> {
        self.num(k)?
            .ok_or_else(|| self.f.invalid(&format!("{}.{k}", self.key), "missing"))
    }

    /// `original_max_position_embeddings`, which Phi-3 keeps at the top level.
    fn original_max(&self) -> Result<usize> {
        match self.num("original_max_position_embeddings")? {
            Some(n) if n >= 1.0 => Ok(n as usize),
            Some(_) => Err(self.f.invalid(
                &format!("{}.original_max_position_embeddings", self.key),
                "must be positive",
            )),
            None => self.f.usize("original_max_position_embeddings"),
        }
    }

    /// The scaling factor, else the ratio of the context to the original one.
    fn factor_or_ratio(&self, original: usize) -> Result<f32> {
        match self.num("factor")? {
            Some(f) => Ok(f),
            None => Ok(self.f.usize("max_position_embeddings")? as f32 / original as f32),
        }
    }

    fn factors(&self, k: &str, half: usize) -> Result<Vec<f32>> {
        let bad = |why: &str| self.f.invalid(&format!("{}.{k}", self.key), why);
        let list = self
            .get(k)
            .and_then(Value::as_array)
            .ok_or_else(|| bad("missing"))?;
        let v: Vec<f32> = list
            .iter()
            .map(|x| {
                x.as_f64()
                    .map(|x| x as f32)
                    .ok_or_else(|| bad("expected numbers"))
            })
            .collect::<Result<_>>()?;
        if v.len() != half {
            return Err(bad(&format!(
                "has {} entries; the rotary dimension needs {half}",
                v.len()
            )));
        }
        Ok(v)
    }

    fn scaling(&self, rotary_dim: usize) -> Result<RopeScaling> {
        let kind = self
            .get("rope_type")
            .or_else(|| self.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        Ok(match kind {
            "default" => RopeScaling::None,
            "linear" => RopeScaling::Linear {
                factor: self.req("factor")?,
            },
            "llama3" => RopeScaling::Llama3 {
                factor: self.req("factor")?,
                low_freq_factor: self.req("low_freq_factor")?,
                high_freq_factor: self.req("high_freq_factor")?,
                original_max_position_embeddings: self.original_max()?,
            },
            "dynamic" => RopeScaling::Dynamic {
                factor: self.req("factor")?,
                max_position_embeddings: self.f.usize("max_position_embeddings")?,
            },
            "yarn" => self.yarn()?,
            // Phi-3's first releases called it "su".
            "longrope" | "su" => {
                let original = self.original_max()?;
                let factor = self.factor_or_ratio(original)?;
                let attention_factor = match self.num("attention_factor")? {
                    Some(a) => a,
                    None if factor <= 1.0 => 1.0,
                    None => (1.0 + factor.ln() / (original as f32).ln()).sqrt(),
                };
                RopeScaling::LongRope {
                    short_factor: self.factors("short_factor", rotary_dim / 2)?,
                    long_factor: self.factors("long_factor", rotary_dim / 2)?,
                    original_max_position_embeddings: original,
                    attention_factor,
                }
            }
            other => {
                return Err(self.f.invalid(
                    &format!("{}.rope_type", self.key),
                    &format!("'{other}' is not supported ({SUPPORTED_SCALING})"),
                ))
            }
        })
    }

    fn yarn(&self) -> Result<RopeScaling> {
        let original = self.original_max()?;
        let factor = self.factor_or_ratio(original)?;
        // transformers: 0.1·mscale·ln(factor) + 1, as a ratio when both mscales are given.
        let mscale = |m: f32| {
            if factor <= 1.0 {
                1.0
            } else {
                0.1 * m * factor.ln() + 1.0
            }
        };
        let attention_factor = match (
            self.num("attention_factor")?,
            self.num("mscale")?,
            self.num("mscale_all_dim")?,
        ) {
            (Some(a), _, _) => a,
            (None, Some(m), Some(all)) if m != 0.0 && all != 0.0 => mscale(m) / mscale(all),
            _ => mscale(1.0),
        };
        Ok(RopeScaling::Yarn {
            factor,
            original_max_position_embeddings: original,
            beta_fast: self.num("beta_fast")?.filter(|&b| b != 0.0).unwrap_or(32.0),
            beta_slow: self.num("beta_slow")?.filter(|&b| b != 0.0).unwrap_or(1.0),
            truncate: self
                .get("truncate")
                .and_then(Value::as_bool)
                .unwrap_or(true),
            attention_factor,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use serde_json::{json, Value};
    use trtllm_runtime::{ModelConfig, PositionKind, RopeScaling};

    use crate::hf_config::parse;

    fn config(arch: &str, extra: Value) -> Value {
        let mut v = json!({"architectures": [arch], "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 6, "num_attention_heads": 4, "head_dim": 16,
            "max_position_embeddings": 131072, "vocab_size": 1024});
        v.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        v
    }

    fn model(v: &Value) -> ModelConfig {
        parse(v, Path::new("config.json")).unwrap().model
    }

    fn scaling(m: &ModelConfig) -> (f32, usize, RopeScaling) {
        match &m.position {
            PositionKind::Rope {
                theta,
                rotary_dim,
                scaling,
            } => (*theta, *rotary_dim, scaling.clone()),
            PositionKind::Learned => panic!("learned positions"),
        }
    }

    #[test]
    fn gemma3_transformers4_config_has_a_local_base_and_every_sixth_layer_global() {
        let m = model(&config(
            "Gemma3ForCausalLM",
            json!({"rope_theta": 1e6, "rope_local_base_freq": 10000.0, "sliding_window": 512,
                   "rope_scaling": {"rope_type": "linear", "factor": 8.0}}),
        ));
        assert_eq!(scaling(&m), (1e6, 16, RopeScaling::Linear { factor: 8.0 }));
        let local = m.features.local_rope.clone().unwrap();
        assert_eq!((local.theta, local.scaling), (10000.0, RopeScaling::None));
        let windows: Vec<_> = (0..6).map(|l| m.window(l)).collect();
        assert_eq!(
            windows,
            [Some(512), Some(512), Some(512), Some(512), Some(512), None]
        );
    }

    #[test]
    fn yarn_attention_factor_and_context_follow_the_factor() {
        let m = model(&config(
            "Qwen3ForCausalLM",
            json!({"max_position_embeddings": 40960, "rope_scaling": {"rope_type": "yarn",
                   "factor": 4.0, "original_max_position_embeddings": 32768}}),
        ));
        let RopeScaling::Yarn {
            attention_factor,
            beta_fast,
            truncate,
            ..
        } = scaling(&m).2
        else {
            panic!("not yarn")
        };
        assert!((attention_factor - (0.1 * 4f32.ln() + 1.0)).abs() < 1e-6);
        assert_eq!((beta_fast, truncate), (32.0, true));
        assert_eq!(m.context_len(), 131072);
        assert!(!m.rope_depends_on_length());
    }

    #[test]
    fn phi3_longrope_reads_the_top_level_original_context() {
        let factors: Vec<f32> = (0..8).map(|i| 1.0 + i as f32).collect();
        let mut v = config(
            "Phi3ForCausalLM",
            json!({"original_max_position_embeddings": 4096, "rope_scaling": {"type": "su",
                   "short_factor": factors, "long_factor": factors}}),
        );
        let m = model(&v);
        let RopeScaling::LongRope {
            attention_factor,
            original_max_position_embeddings,
            ..
        } = scaling(&m).2
        else {
            panic!("not longrope")
        };
        assert_eq!(original_max_position_embeddings, 4096);
        let want = (1.0 + 32f32.ln() / 4096f32.ln()).sqrt();
        assert!((attention_factor - want).abs() < 1e-6);
        assert!(m.rope_depends_on_length());

        v["rope_scaling"]["long_factor"] = json!([1.0, 2.0]);
        let e = parse(&v, Path::new("config.json"))
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("rope_scaling.long_factor") && e.contains("needs 8"),
            "{e}"
        );
    }

    #[test]
    fn an_unknown_scaling_names_the_supported_ones() {
        let v = config(
            "LlamaForCausalLM",
            json!({"rope_scaling": {"rope_type": "mrope", "factor": 2.0}}),
        );
        let e = parse(&v, Path::new("config.json"))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("'mrope'") && e.contains("longrope"), "{e}");
    }
}
