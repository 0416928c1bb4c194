//! `Quantizer`: TensorRT-LLM's `quantize(model, config)` walk, one module at a time. The
//! builder hands it every linear module's f32 weights by name; it picks the method from the
//! module's [`QuantMode`] (excluded modules stay float), converts the weights and counts
//! quantized / total modules for the report.

use crate::calib::{ActStats, Calibration};
use crate::config::{LayerQuantConfig, QuantAlgo, QuantConfig, QuantMode};
use crate::format::{quantize_rtn, PackedWeight, WeightFormat};
use crate::gptq::quantize_gptq;
use crate::scaling::{fp8_static, search_scales, smooth};
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
    calibration: Option<&'a Calibration>,
    report: QuantReport,
}

impl<'a> Quantizer<'a> {
    /// Validates `config`, and checks each exclude pattern against `modules`. Configs that
    /// need calibration need `calibration`: statistics of the float model's activations.
    pub fn new(
        config: &'a LayerQuantConfig,
        modules: &[String],
        calibration: Option<&'a Calibration>,
    ) -> Result<Self> {
        config.validate()?;
        if config.needs_calibration() && calibration.is_none() {
            return Err(QuantError::InvalidConfig {
                field: "calib_dataset",
                msg: format!(
                    "{} needs calibration statistics; none were collected",
                    config.quant_algo()
                ),
            });
        }
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
            calibration,
            report: QuantReport::default(),
        })
    }

    /// The format module `name` (of `cols` input columns) will be stored in under `config`;
    /// None: kept float. What [`Self::quantize`] decides, known before any weight is read.
    pub fn planned_format(
        config: &LayerQuantConfig,
        name: &str,
        cols: usize,
    ) -> Option<WeightFormat> {
        let mode = config.layer_quant_mode(name);
        let format = Self::format_for(name, config.layer_config(name), mode, cols)?;
        format.check_cols(cols).is_ok().then_some(format)
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
        let q = self.convert(name, cfg, format, w, [rows, cols])?;
        self.report.quantized += 1;
        self.report.formats.push((name.into(), format.describe()));
        Ok(Some(q))
    }

    /// The algorithm's conversion. The output head is weight-only and never observed, so it
    /// is always rounded to nearest.
    fn convert(
        &self,
        name: &str,
        cfg: &QuantConfig,
        format: WeightFormat,
        w: &[f32],
        shape: [usize; 2],
    ) -> Result<QuantizedLinear> {
        let [rows, cols] = shape;
        if name == LM_HEAD || !cfg.needs_calibration() {
            return Ok(QuantizedLinear {
                weight: quantize_rtn(format, w, rows, cols)?,
                pre_quant_scale: None,
                input_scale: None,
            });
        }
        let stats = self.stats(name)?;
        let pre = cfg.pre_quant_scale;
        match cfg.quant_algo {
            QuantAlgo::W4A16Awq => search_scales(format, w, shape, stats, false),
            QuantAlgo::Nvfp4 if pre => search_scales(format, w, shape, stats, false),
            QuantAlgo::Fp8 if pre => search_scales(format, w, shape, stats, true),
            QuantAlgo::Fp8 => fp8_static(format, w, shape, stats),
            QuantAlgo::W8A8SqPerChannel if pre => {
                smooth(format, w, shape, stats, cfg.smoothquant_val)
            }
            QuantAlgo::W4A16Gptq | QuantAlgo::W8A16Gptq => {
                let h = stats.hessian().ok_or_else(|| QuantError::Uncalibrated {
                    module: name.into(),
                    what: "a Hessian",
                })?;
                Ok(QuantizedLinear {
                    weight: quantize_gptq(format, w, rows, cols, &h)?,
                    pre_quant_scale: None,
                    input_scale: None,
                })
            }
            algo => Err(QuantError::InvalidConfig {
                field: "quant_algo",
                msg: format!("{algo} has no calibrated conversion"),
            }),
        }
    }

    fn stats(&self, name: &str) -> Result<&ActStats> {
        self.calibration
            .and_then(|c| c.get(name))
            .ok_or_else(|| QuantError::Uncalibrated {
                module: name.into(),
                what: "activation statistics",
            })
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
            _ if head => WeightFormat::Int8 {
                group: cols,
                zero_point: false,
            },
            QuantAlgo::W4A16 | QuantAlgo::W4A16Awq | QuantAlgo::W4A16Gptq => WeightFormat::Int4 {
                group: cfg.group_size.min(cols),
                zero_point: cfg.has_zero_point,
            },
            QuantAlgo::W8A16 | QuantAlgo::W8A16Gptq => WeightFormat::Int8 {
                group: cols,
                zero_point: false,
            },
            QuantAlgo::W8A8SqPerChannel => WeightFormat::W8A8,
            QuantAlgo::Nvfp4 => WeightFormat::Nvfp4,
            QuantAlgo::NoQuant | QuantAlgo::Int8 | QuantAlgo::MixedPrecision => return None,
        })
    }

    pub fn into_report(self) -> QuantReport {
        self.report
    }
}
