//! `Quantizer`: TensorRT-LLM's `quantize(model, config)` walk, one module at a time. The
//! builder hands it every linear module's f32 weights by name; it picks the method from the
//! module's [`QuantMode`] (excluded modules stay float), converts the weights and counts
//! quantized / total modules for the report.

use crate::config::{LayerQuantConfig, QuantAlgo, QuantConfig, QuantMode};
use crate::format::{quantize_rtn, PackedWeight, WeightFormat};
use crate::{QuantError, Result};

/// A quantized linear module: its packed weight and the activation-side tensors.
#[derive(Clone, Debug)]
pub struct QuantizedLinear {
    pub weight: PackedWeight,
    /// Multiplied into the activations per input channel before the product.
    pub pre_quant_scale: Option<Vec<f32>>,
    /// Static FP8 activation scale.
    pub input_scale: Option<f32>,
}

/// What [`Quantizer`] did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct QuantReport {
    pub quantized: usize,
    pub total: usize,
    /// Modules left in float and why (excluded, or a shape the format cannot store).
    pub kept_float: Vec<(String, String)>,
    /// Module → format description, in the order seen.
    pub formats: Vec<(String, String)>,
}

impl std::fmt::Display for QuantReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{} modules quantized", self.quantized, self.total)
    }
}

/// The module name of the output head; with tied embeddings it is also the embedding table.
pub const LM_HEAD: &str = "lm_head";

pub struct Quantizer<'a> {
    config: &'a LayerQuantConfig,
    report: QuantReport,
}

impl<'a> Quantizer<'a> {
    /// Validates `config`, and checks each exclude pattern against `modules`.
    pub fn new(config: &'a LayerQuantConfig, modules: &[String]) -> Result<Self> {
        config.validate()?;
        for c in std::iter::once(&config.base).chain(config.quantized_layers.values()) {
            c.check_excludes(modules.iter().map(String::as_str))?;
        }
        if let Some(name) = config
            .quantized_layers
            .keys()
            .find(|k| !modules.contains(k))
        {
            return Err(QuantError::UnknownModule {
                pattern: name.clone(),
                examples: modules
                    .iter()
                    .take(6)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        Ok(Self {
            config,
            report: QuantReport::default(),
        })
    }

    /// Quantizes module `name` (`rows × cols`, f32), or returns None to keep it float.
    pub fn quantize(
        &mut self,
        name: &str,
        w: &[f32],
        rows: usize,
        cols: usize,
    ) -> Result<Option<QuantizedLinear>> {
        self.report.total += 1;
        let mode = self.config.layer_quant_mode(name);
        let cfg = self.config.layer_config(name);
        let Some(format) = Self::format_for(name, cfg, mode, cols) else {
            let why = if mode.is_empty() {
                "not quantized"
            } else {
                "excluded"
            };
            self.report.kept_float.push((name.into(), why.into()));
            return Ok(None);
        };
        if let Err(e) = format.check_cols(cols) {
            self.report.kept_float.push((name.into(), e.to_string()));
            return Ok(None);
        }
        if cfg.needs_calibration() {
            return Err(QuantError::InvalidConfig {
                field: "quant_algo",
                msg: format!(
                    "{} needs calibration, which this build does not implement yet \
                     (available: W8A16, W4A16, FP8, NVFP4, W8A8 with pre_quant_scale off)",
                    cfg.quant_algo
                ),
            });
        }
        let weight = quantize_rtn(format, w, rows, cols)?;
        self.report.quantized += 1;
        self.report.formats.push((name.into(), format.describe()));
        Ok(Some(QuantizedLinear {
            weight,
            pre_quant_scale: None,
            input_scale: None,
        }))
    }

    /// The storage format for a module. The output head keeps 8 bits under 4-bit algorithms,
    /// as llama.cpp keeps its output tensor at 6–8 bits: it is the most sensitive matrix.
    fn format_for(
        name: &str,
        cfg: &QuantConfig,
        mode: QuantMode,
        cols: usize,
    ) -> Option<WeightFormat> {
        if cfg.excludes(name) || mode.is_empty() {
            return None;
        }
        let head = name == LM_HEAD;
        Some(match cfg.quant_algo {
            QuantAlgo::Fp8 => WeightFormat::Fp8,
            _ if head => WeightFormat::Int8 { group: cols },
            QuantAlgo::W4A16 | QuantAlgo::W4A16Awq | QuantAlgo::W4A16Gptq => WeightFormat::Int4 {
                group: cfg.group_size.min(cols),
                zero_point: cfg.has_zero_point,
            },
            QuantAlgo::W8A16 | QuantAlgo::W8A16Gptq => WeightFormat::Int8 { group: cols },
            QuantAlgo::W8A8SqPerChannel => WeightFormat::W8A8,
            QuantAlgo::Nvfp4 => WeightFormat::Nvfp4,
            QuantAlgo::NoQuant | QuantAlgo::Int8 | QuantAlgo::MixedPrecision => return None,
        })
    }

    pub fn into_report(self) -> QuantReport {
        self.report
    }
}
