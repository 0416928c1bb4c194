//! What to quantize and how: [`QuantAlgo`], the [`QuantMode`] flags derived from a config the
//! way TensorRT-LLM's `QuantConfig.quant_mode` derives them, [`QuantConfig`] and per-layer
//! mixed precision ([`LayerQuantConfig`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{QuantError, Result};

/// Quantization algorithms, spelled as TensorRT-LLM spells them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum QuantAlgo {
    #[default]
    NoQuant,
    #[serde(rename = "W8A16")]
    W8A16,
    #[serde(rename = "W4A16")]
    W4A16,
    #[serde(rename = "W4A16_AWQ")]
    W4A16Awq,
    #[serde(rename = "W4A16_GPTQ")]
    W4A16Gptq,
    #[serde(rename = "W8A16_GPTQ")]
    W8A16Gptq,
    #[serde(rename = "W8A8_SQ_PER_CHANNEL")]
    W8A8SqPerChannel,
    #[serde(rename = "FP8")]
    Fp8,
    #[serde(rename = "NVFP4")]
    Nvfp4,
    /// KV cache only.
    #[serde(rename = "INT8")]
    Int8,
    /// Layers quantized differently (see [`LayerQuantConfig`]).
    MixedPrecision,
}

/// The KV-cache algorithms this engine stores.
pub const KV_CACHE_QUANT_ALGOS: [QuantAlgo; 2] = [QuantAlgo::Int8, QuantAlgo::Fp8];

impl QuantAlgo {
    pub fn name(self) -> &'static str {
        match self {
            QuantAlgo::NoQuant => "NO_QUANT",
            QuantAlgo::W8A16 => "W8A16",
            QuantAlgo::W4A16 => "W4A16",
            QuantAlgo::W4A16Awq => "W4A16_AWQ",
            QuantAlgo::W4A16Gptq => "W4A16_GPTQ",
            QuantAlgo::W8A16Gptq => "W8A16_GPTQ",
            QuantAlgo::W8A8SqPerChannel => "W8A8_SQ_PER_CHANNEL",
            QuantAlgo::Fp8 => "FP8",
            QuantAlgo::Nvfp4 => "NVFP4",
            QuantAlgo::Int8 => "INT8",
            QuantAlgo::MixedPrecision => "MIXED_PRECISION",
        }
    }

    /// Parses TensorRT-LLM names and the CLI's lower-case short forms (`w4a16_awq`, `w8a8_sq`).
    pub fn parse(s: &str) -> Result<Self> {
        let up = s.to_ascii_uppercase();
        let up = if up == "W8A8_SQ" {
            "W8A8_SQ_PER_CHANNEL".to_string()
        } else {
            up
        };
        serde_json::from_value(serde_json::Value::String(up))
            .map_err(|_| QuantError::UnknownAlgo(s.to_string()))
    }
}

impl std::fmt::Display for QuantAlgo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Bit flags describing how weights, activations and the KV cache are quantized.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct QuantMode(pub u32);

impl QuantMode {
    pub const INT4_WEIGHTS: Self = Self(1 << 0);
    pub const INT8_WEIGHTS: Self = Self(1 << 1);
    pub const ACTIVATIONS: Self = Self(1 << 2);
    pub const PER_CHANNEL: Self = Self(1 << 3);
    pub const PER_TOKEN: Self = Self(1 << 4);
    pub const PER_GROUP: Self = Self(1 << 5);
    pub const INT8_KV_CACHE: Self = Self(1 << 6);
    pub const FP8_KV_CACHE: Self = Self(1 << 7);
    pub const FP8_QDQ: Self = Self(1 << 8);
    pub const NVFP4: Self = Self(1 << 9);
    pub const NVFP4_KV_CACHE: Self = Self(1 << 10);

    pub fn contains(self, flag: Self) -> bool {
        self.0 & flag.0 == flag.0
    }
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
    pub fn is_weight_only(self) -> bool {
        self.is_int4_weight_only() || self.is_int8_weight_only()
    }
    pub fn is_int4_weight_only(self) -> bool {
        self.contains(Self::INT4_WEIGHTS) && !self.contains(Self::ACTIVATIONS)
    }
    pub fn is_int8_weight_only(self) -> bool {
        self.contains(Self::INT8_WEIGHTS) && !self.contains(Self::ACTIVATIONS)
    }
    pub fn has_act_and_weight_quant(self) -> bool {
        self.contains(Self::ACTIVATIONS)
            && (self.contains(Self::INT8_WEIGHTS) || self.contains(Self::INT4_WEIGHTS))
    }
    pub fn has_per_group_scaling(self) -> bool {
        self.contains(Self::PER_GROUP)
    }
    pub fn has_fp8_qdq(self) -> bool {
        self.contains(Self::FP8_QDQ)
    }
    pub fn has_nvfp4(self) -> bool {
        self.contains(Self::NVFP4)
    }
    pub fn has_kv_cache_quant(self) -> bool {
        self.contains(Self::INT8_KV_CACHE)
            || self.contains(Self::FP8_KV_CACHE)
            || self.contains(Self::NVFP4_KV_CACHE)
    }
}

impl std::ops::BitOr for QuantMode {
    type Output = Self;
    fn bitor(self, rhs: Self) -> Self {
        Self(self.0 | rhs.0)
    }
}

impl std::ops::BitOrAssign for QuantMode {
    fn bitor_assign(&mut self, rhs: Self) {
        self.0 |= rhs.0;
    }
}

/// How a model is quantized. Field names and defaults follow TensorRT-LLM's `QuantConfig`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QuantConfig {
    pub quant_algo: QuantAlgo,
    pub kv_cache_quant_algo: QuantAlgo,
    /// Values per scale group of W4A16 / W8A16 groupwise weights.
    pub group_size: usize,
    pub has_zero_point: bool,
    /// Scale activations per input channel before the product (AWQ, SmoothQuant).
    pub pre_quant_scale: bool,
    /// Modules left unquantized: any module whose name contains one of these.
    pub exclude_modules: Option<Vec<String>>,
    pub activation_scaling_factor: f32,
    pub weight_scaling_factor: f32,
    /// SmoothQuant migration strength α: `s_j = max|X_j|^α / max|W_j|^(1−α)`.
    pub smoothquant_val: f32,
    /// Calibration: at most this many sequences of at most `calib_max_seq_length` tokens.
    pub calib_size: usize,
    pub calib_max_seq_length: usize,
    /// Calibration text: a path to a UTF-8 text file.
    pub calib_dataset: Option<String>,
}

impl Default for QuantConfig {
    fn default() -> Self {
        Self {
            quant_algo: QuantAlgo::NoQuant,
            kv_cache_quant_algo: QuantAlgo::NoQuant,
            group_size: 128,
            has_zero_point: true,
            pre_quant_scale: false,
            exclude_modules: None,
            activation_scaling_factor: 1.0,
            weight_scaling_factor: 1.0,
            smoothquant_val: 0.5,
            calib_size: 64,
            calib_max_seq_length: 512,
            calib_dataset: None,
        }
    }
}

impl QuantConfig {
    /// A config for `algo` with the defaults its algorithm expects (AWQ, SmoothQuant and NVFP4
    /// scale activations per channel, FP8 only with its static scale; SmoothQuant and FP8 have no
    /// groups).
    pub fn for_algo(algo: QuantAlgo) -> Self {
        Self {
            quant_algo: algo,
            pre_quant_scale: matches!(
                algo,
                QuantAlgo::W4A16Awq | QuantAlgo::W8A8SqPerChannel | QuantAlgo::Nvfp4
            ),
            ..Self::default()
        }
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |field: &'static str, msg: String| Err(QuantError::InvalidConfig { field, msg });
        match self.quant_algo {
            QuantAlgo::Int8 => return bad(
                "quant_algo",
                "INT8 is a KV-cache algorithm; for int8 weights use W8A16 or W8A8_SQ_PER_CHANNEL"
                    .into(),
            ),
            QuantAlgo::W4A16Awq if ![64, 128].contains(&self.group_size) => {
                return bad(
                    "group_size",
                    format!(
                        "AWQ quantization requires group_size 64 or 128, got {}",
                        self.group_size
                    ),
                )
            }
            QuantAlgo::W4A16 | QuantAlgo::W4A16Gptq
                if self.group_size == 0 || !self.group_size.is_multiple_of(32) =>
            {
                return bad(
                    "group_size",
                    format!(
                        "{} needs a group_size that is a positive multiple of 32, got {}",
                        self.quant_algo, self.group_size
                    ),
                )
            }
            _ => {}
        }
        let kv = self.kv_cache_quant_algo;
        if kv != QuantAlgo::NoQuant && !KV_CACHE_QUANT_ALGOS.contains(&kv) {
            return bad(
                "kv_cache_quant_algo",
                format!("unsupported KV cache quantization {kv} (allowed: INT8, FP8)"),
            );
        }
        if !(0.0..=1.0).contains(&self.smoothquant_val) {
            return bad(
                "smoothquant_val",
                format!("must be in [0, 1], got {}", self.smoothquant_val),
            );
        }
        if self.needs_calibration() && self.calib_size == 0 {
            return bad("calib_size", "must be positive".into());
        }
        if self.needs_calibration() && self.calib_max_seq_length == 0 {
            return bad("calib_max_seq_length", "must be positive".into());
        }
        Ok(())
    }

    /// The flags of this config, derived exactly as TensorRT-LLM's `quant_mode` property.
    pub fn quant_mode(&self) -> QuantMode {
        let mut mode = QuantMode::default();
        match self.quant_algo {
            QuantAlgo::W4A16 | QuantAlgo::W4A16Awq | QuantAlgo::W4A16Gptq => {
                mode |= QuantMode::INT4_WEIGHTS;
                if self.group_size > 0 {
                    mode |= QuantMode::PER_GROUP;
                }
            }
            QuantAlgo::W8A16 | QuantAlgo::W8A16Gptq => {
                mode |= QuantMode::INT8_WEIGHTS | QuantMode::PER_CHANNEL;
            }
            QuantAlgo::W8A8SqPerChannel => {
                mode |= QuantMode::INT8_WEIGHTS | QuantMode::PER_CHANNEL;
            }
            QuantAlgo::Fp8 => mode |= QuantMode::FP8_QDQ,
            QuantAlgo::Nvfp4 => mode |= QuantMode::NVFP4,
            QuantAlgo::NoQuant | QuantAlgo::Int8 | QuantAlgo::MixedPrecision => {}
        }
        if self.quant_algo.name().contains("A8") {
            mode |= QuantMode::ACTIVATIONS | QuantMode::PER_TOKEN;
        }
        match self.kv_cache_quant_algo {
            QuantAlgo::Int8 => mode |= QuantMode::INT8_KV_CACHE,
            QuantAlgo::Fp8 => mode |= QuantMode::FP8_KV_CACHE,
            QuantAlgo::Nvfp4 => mode |= QuantMode::NVFP4_KV_CACHE,
            _ => {}
        }
        mode
    }

    /// Whether quantizing needs calibration activations: AWQ and GPTQ search with them,
    /// SmoothQuant migrates activation ranges into the weights, FP8 takes its static activation
    /// scale from them, NVFP4 with `pre_quant_scale` searches AWQ-style scales.
    pub fn needs_calibration(&self) -> bool {
        match self.quant_algo {
            QuantAlgo::W4A16Awq | QuantAlgo::W4A16Gptq | QuantAlgo::W8A16Gptq | QuantAlgo::Fp8 => {
                true
            }
            QuantAlgo::W8A8SqPerChannel | QuantAlgo::Nvfp4 => self.pre_quant_scale,
            _ => false,
        }
    }

    /// Whether module `name` is excluded.
    pub fn excludes(&self, name: &str) -> bool {
        self.exclude_modules
            .iter()
            .flatten()
            .any(|e| name.contains(e.as_str()))
    }

    /// Every exclude pattern must name at least one of `modules`.
    pub fn check_excludes<'a>(&self, modules: impl Iterator<Item = &'a str> + Clone) -> Result<()> {
        for pattern in self.exclude_modules.iter().flatten() {
            if !modules.clone().any(|m| m.contains(pattern.as_str())) {
                let mut examples: Vec<&str> = modules.clone().take(6).collect();
                examples.push("...");
                return Err(QuantError::UnknownModule {
                    pattern: pattern.clone(),
                    examples: examples.join(", "),
                });
            }
        }
        Ok(())
    }
}

/// Mixed precision: a config per module name (exact match), the base config for the rest.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LayerQuantConfig {
    pub base: QuantConfig,
    pub quantized_layers: BTreeMap<String, QuantConfig>,
}

impl LayerQuantConfig {
    pub fn uniform(base: QuantConfig) -> Self {
        Self {
            base,
            quantized_layers: BTreeMap::new(),
        }
    }

    /// The config module `name` is quantized with.
    pub fn layer_config(&self, name: &str) -> &QuantConfig {
        self.quantized_layers.get(name).unwrap_or(&self.base)
    }

    pub fn layer_quant_mode(&self, name: &str) -> QuantMode {
        let c = self.layer_config(name);
        if c.excludes(name) {
            QuantMode(c.quant_mode().0 & (QuantMode::INT8_KV_CACHE.0 | QuantMode::FP8_KV_CACHE.0))
        } else {
            c.quant_mode()
        }
    }

    /// The algorithm recorded for the whole model.
    pub fn quant_algo(&self) -> QuantAlgo {
        if self.quantized_layers.is_empty() {
            self.base.quant_algo
        } else {
            QuantAlgo::MixedPrecision
        }
    }

    pub fn needs_calibration(&self) -> bool {
        std::iter::once(&self.base)
            .chain(self.quantized_layers.values())
            .any(QuantConfig::needs_calibration)
    }

    pub fn validate(&self) -> Result<()> {
        self.base.validate()?;
        for (name, c) in &self.quantized_layers {
            c.validate().map_err(|e| QuantError::Layer {
                layer: name.clone(),
                source: Box::new(e),
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(algo: QuantAlgo) -> QuantConfig {
        QuantConfig::for_algo(algo)
    }

    #[test]
    fn quant_mode_flags_follow_the_algorithm() {
        let m = cfg(QuantAlgo::W4A16Awq).quant_mode();
        assert!(m.contains(QuantMode::INT4_WEIGHTS) && m.has_per_group_scaling());
        assert!(m.is_int4_weight_only() && !m.has_act_and_weight_quant());
        let m = cfg(QuantAlgo::W8A16).quant_mode();
        assert!(m.is_int8_weight_only() && m.contains(QuantMode::PER_CHANNEL));
        let m = cfg(QuantAlgo::W8A8SqPerChannel).quant_mode();
        assert!(m.has_act_and_weight_quant() && m.contains(QuantMode::PER_TOKEN));
        assert!(cfg(QuantAlgo::Fp8).quant_mode().has_fp8_qdq());
        assert!(cfg(QuantAlgo::Nvfp4).quant_mode().has_nvfp4());
        let kv = QuantConfig {
            kv_cache_quant_algo: QuantAlgo::Int8,
            ..QuantConfig::default()
        };
        assert_eq!(kv.quant_mode(), QuantMode::INT8_KV_CACHE);
        assert!(kv.quant_mode().has_kv_cache_quant());
        assert!(QuantConfig::default().quant_mode().is_empty());
    }

    #[test]
    fn bad_configs_name_the_field() {
        let awq96 = QuantConfig {
            group_size: 96,
            ..cfg(QuantAlgo::W4A16Awq)
        };
        let e = awq96.validate().unwrap_err().to_string();
        assert!(e.contains("group_size") && e.contains("64 or 128"), "{e}");
        let kv = QuantConfig {
            kv_cache_quant_algo: QuantAlgo::W4A16,
            ..QuantConfig::default()
        };
        let e = kv.validate().unwrap_err().to_string();
        assert!(
            e.contains("kv_cache_quant_algo") && e.contains("W4A16"),
            "{e}"
        );
        assert!(cfg(QuantAlgo::Int8).validate().is_err());
        let e = QuantAlgo::parse("w3a16").unwrap_err().to_string();
        assert!(e.contains("w3a16"), "{e}");
        let ex = QuantConfig {
            exclude_modules: Some(vec!["lm_head".into(), "mlp.nope".into()]),
            ..cfg(QuantAlgo::W8A16)
        };
        let modules = ["layers.0.qkv", "lm_head"];
        let e = ex
            .check_excludes(modules.iter().copied())
            .unwrap_err()
            .to_string();
        assert!(e.contains("mlp.nope"), "{e}");
    }

    #[test]
    fn configs_round_trip_through_json_and_parse_cli_names() {
        let mut layers = LayerQuantConfig::uniform(cfg(QuantAlgo::W4A16Gptq));
        layers
            .quantized_layers
            .insert("lm_head".into(), cfg(QuantAlgo::W8A16));
        let text = serde_json::to_string(&layers).unwrap();
        assert!(text.contains("\"W4A16_GPTQ\"") && text.contains("\"W8A16\""));
        let back: LayerQuantConfig = serde_json::from_str(&text).unwrap();
        assert_eq!(back, layers);
        assert_eq!(back.quant_algo(), QuantAlgo::MixedPrecision);
        assert_eq!(back.layer_config("lm_head").quant_algo, QuantAlgo::W8A16);
        assert_eq!(
            QuantAlgo::parse("w8a8_sq").unwrap(),
            QuantAlgo::W8A8SqPerChannel
        );
        assert_eq!(QuantAlgo::parse("fp8").unwrap(), QuantAlgo::Fp8);
        let excluded = LayerQuantConfig::uniform(QuantConfig {
            exclude_modules: Some(vec!["lm_head".into()]),
            ..cfg(QuantAlgo::W8A16)
        });
        assert!(excluded.layer_quant_mode("lm_head").is_empty());
        assert!(excluded.layer_quant_mode("layers.3.qkv").is_weight_only());
    }
}
