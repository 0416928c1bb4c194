//! Weight matrices and linear layers as the engine stores them: float, or packed codes plus
//! their scale tensors (see the engine format in [`crate::engine`]). Everything is validated
//! when the engine opens, so a forward pass never meets an inconsistent tensor.

use std::borrow::Cow;

use trtllm_quant::codec::fp8_qdq;
use trtllm_quant::kernels::cpu::{self, MatRef, WeightData};
use trtllm_quant::{DType, PackedRef, WeightFormat};

use crate::engine::{EngineFile, TensorInfo};
use crate::tuning::Tactics;
use crate::{Result, RuntimeError};

/// Looks up `name`, which must have `shape`.
pub(crate) fn tensor(file: &EngineFile, name: &str, shape: &[usize]) -> Result<TensorInfo> {
    let t = file
        .info(name)
        .ok_or_else(|| RuntimeError::MissingTensor(name.into()))?;
    if t.shape != shape {
        return Err(RuntimeError::TensorShape {
            name: name.into(),
            expected: shape.to_vec(),
            got: t.shape.clone(),
        });
    }
    Ok(t.clone())
}

/// An `input_perm` tensor's column indices, which must be a permutation of its length (a
/// corrupt one would read out of bounds or read a column twice).
fn permutation(file: &EngineFile, t: &TensorInfo) -> Result<Vec<u32>> {
    let v = f32s(file, t)?;
    let mut seen = vec![false; v.len()];
    let mut perm = Vec::with_capacity(v.len());
    for &f in v {
        let c = f as usize;
        if f < 0.0 || f.fract() != 0.0 || c >= v.len() || std::mem::replace(&mut seen[c], true) {
            return Err(RuntimeError::InvalidConfig(format!(
                "{} is not a permutation of 0..{} (holds {f})",
                t.name,
                v.len()
            )));
        }
        perm.push(c as u32);
    }
    Ok(perm)
}

/// Like [`tensor`], but absent is fine; present tensors must be float32.
pub(crate) fn optional_f32(
    file: &EngineFile,
    name: &str,
    shape: &[usize],
) -> Result<Option<TensorInfo>> {
    let Some(_) = file.info(name) else {
        return Ok(None);
    };
    let t = tensor(file, name, shape)?;
    if t.dtype != DType::F32 {
        return Err(RuntimeError::InvalidConfig(format!(
            "{name} must be float32, is {}",
            t.dtype
        )));
    }
    Ok(Some(t))
}

pub(crate) fn f32s<'a>(file: &'a EngineFile, t: &TensorInfo) -> Result<&'a [f32]> {
    match t.dtype.view(file.bytes(t), &t.name)? {
        WeightData::F32(d) => Ok(d),
        _ => Err(RuntimeError::InvalidConfig(format!(
            "{} must be float32",
            t.name
        ))),
    }
}

/// Scales multiply every weight they cover: a NaN or infinity among them is a corrupt engine
/// (its checksum may still hold), refused at load rather than emitting garbage.
fn check_finite(file: &EngineFile, t: &Option<TensorInfo>) -> Result<()> {
    let Some(t) = t else { return Ok(()) };
    match f32s(file, t)?.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(index) => Err(RuntimeError::NonFiniteTensor {
            name: t.name.clone(),
            index,
            value: f32s(file, t)?[index],
        }),
    }
}

fn bytes_of<'a>(file: &'a EngineFile, t: &Option<TensorInfo>) -> &'a [u8] {
    t.as_ref().map_or(&[][..], |t| file.bytes(t))
}

/// The scale tensors of a packed weight.
#[derive(Clone, Debug)]
struct Packed {
    format: WeightFormat,
    scale: Option<TensorInfo>,
    offset: Option<TensorInfo>,
    block_scale: Option<TensorInfo>,
    global_scale: Option<TensorInfo>,
}

/// A `[rows × cols]` matrix of the engine.
#[derive(Clone, Debug)]
pub(crate) struct Weight {
    data: TensorInfo,
    rows: usize,
    cols: usize,
    packed: Option<Packed>,
}

impl Weight {
    /// Storage and shape, as `trtllm inspect` names formats (`int4 g128 zp 1536x576`).
    pub fn describe(&self) -> String {
        let format = self.packed.as_ref().map_or_else(
            || self.data.dtype.name().to_string(),
            |p| p.format.describe(),
        );
        format!("{format} {}x{}", self.rows, self.cols)
    }

    /// Loads `{prefix}.weight` (and its scales when it is packed) and checks it is a valid
    /// `rows × cols` matrix.
    pub fn load(file: &EngineFile, prefix: &str, rows: usize, cols: usize) -> Result<Self> {
        let name = format!("{prefix}.weight");
        let info = file
            .info(&name)
            .ok_or_else(|| RuntimeError::MissingTensor(name.clone()))?;
        let packed = match info.format {
            None => None,
            Some(format) => {
                format.check_cols(cols)?;
                let spr = format.scales_per_row(cols);
                let need = |suffix: &str, shape: &[usize]| {
                    tensor(file, &format!("{prefix}.{suffix}"), shape).map(Some)
                };
                let zero_point = format.has_offsets();
                let nvfp4 = format == WeightFormat::Nvfp4;
                Some(Packed {
                    format,
                    scale: if spr > 0 {
                        need("weight_scale", &[rows, spr])?
                    } else {
                        None
                    },
                    offset: if zero_point {
                        need("weight_offset", &[rows, spr])?
                    } else {
                        None
                    },
                    block_scale: if nvfp4 {
                        need("weight_block_scale", &[rows, cols / 16])?
                    } else {
                        None
                    },
                    global_scale: if nvfp4 {
                        need("weight_global_scale", &[1])?
                    } else {
                        None
                    },
                })
            }
        };
        let shape = match &packed {
            Some(p) => [rows, p.format.code_bytes(cols)],
            None => [rows, cols],
        };
        let w = Self {
            data: tensor(file, &name, &shape)?,
            rows,
            cols,
            packed,
        };
        w.mat(file)?;
        if let Some(p) = &w.packed {
            for t in [&p.scale, &p.offset, &p.global_scale] {
                check_finite(file, t)?;
            }
        }
        Ok(w)
    }

    pub fn mat<'a>(&self, file: &'a EngineFile) -> Result<MatRef<'a>> {
        let data = match &self.packed {
            None => self
                .data
                .dtype
                .view(file.bytes(&self.data), &self.data.name)?,
            Some(p) => {
                let floats = |t: &Option<TensorInfo>| -> Result<Option<&'a [f32]>> {
                    t.as_ref().map(|t| f32s(file, t)).transpose()
                };
                PackedRef {
                    format: p.format,
                    codes: file.bytes(&self.data),
                    scales: floats(&p.scale)?.unwrap_or(&[]),
                    offsets: floats(&p.offset)?,
                    block_scales: bytes_of(file, &p.block_scale),
                    global_scale: floats(&p.global_scale)?.map_or(1.0, |g| g[0]),
                }
                .view()
            }
        };
        Ok(MatRef::new(data, self.rows, self.cols)?)
    }
}

/// `y = (x[input_perm] ∘ pre_quant_scale) · Wᵀ + bias`, with FP8 activation quantization when
/// the layer has a static `input_scale`.
#[derive(Clone, Debug)]
pub(crate) struct Linear {
    /// The module name (the tensor prefix).
    pub name: String,
    pub weight: Weight,
    pub bias: Option<TensorInfo>,
    /// The input column each weight column reads (checked to be a permutation).
    pub input_perm: Option<Vec<u32>>,
    pub pre_quant_scale: Option<TensorInfo>,
    pub input_scale: Option<TensorInfo>,
}

impl Linear {
    pub fn load(file: &EngineFile, prefix: &str, rows: usize, cols: usize) -> Result<Self> {
        let perm = optional_f32(file, &format!("{prefix}.input_perm"), &[cols])?;
        let pre_quant_scale = optional_f32(file, &format!("{prefix}.pre_quant_scale"), &[cols])?;
        let input_scale = optional_f32(file, &format!("{prefix}.input_scale"), &[1])?;
        check_finite(file, &pre_quant_scale)?;
        check_finite(file, &input_scale)?;
        Ok(Self {
            name: prefix.to_string(),
            weight: Weight::load(file, prefix, rows, cols)?,
            bias: optional_f32(file, &format!("{prefix}.bias"), &[rows])?,
            input_perm: perm.map(|t| permutation(file, &t)).transpose()?,
            pre_quant_scale,
            input_scale,
        })
    }

    pub fn forward(
        &self,
        file: &EngineFile,
        x: &[f32],
        rows: usize,
        tactics: &Tactics,
    ) -> Result<Vec<f32>> {
        let w = self.weight.mat(file)?;
        let bias = self.bias.as_ref().map(|b| f32s(file, b)).transpose()?;
        let x = self.prepare(file, x)?;
        let mut y = vec![0f32; rows * w.rows()];
        cpu::linear_with(&x, rows, w, bias, &mut y, &tactics.get(rows))?;
        Ok(y)
    }

    /// The activations as the weight reads them: gathered by `input_perm`, scaled by
    /// `pre_quant_scale`, through FP8 with `input_scale`.
    fn prepare<'x>(&self, file: &EngineFile, x: &'x [f32]) -> Result<Cow<'x, [f32]>> {
        let mut x = Cow::Borrowed(x);
        if let Some(perm) = &self.input_perm {
            let rows = x.chunks_exact(perm.len());
            x = Cow::Owned(
                rows.flat_map(|row| perm.iter().map(|&c| row[c as usize]))
                    .collect(),
            );
        }
        if let Some(s) = &self.pre_quant_scale {
            let s = f32s(file, s)?;
            for row in x.to_mut().chunks_exact_mut(s.len()) {
                row.iter_mut().zip(s).for_each(|(v, m)| *v *= m);
            }
        }
        if let Some(s) = &self.input_scale {
            fp8_qdq(x.to_mut(), f32s(file, s)?[0]);
        }
        Ok(x)
    }
}
