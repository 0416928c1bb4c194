//! Packed weight formats: how a quantized `[rows × cols]` matrix is stored, and round-to-nearest
//! (RTN) packing of f32 weights into each. Calibrated algorithms (AWQ, GPTQ, SmoothQuant) change
//! what is packed or how codes are chosen, never the layout.

use serde::{Deserialize, Serialize};
use trtllm_kernels::cpu::{
    Fp8Weights, Int4Weights, Int8Weights, Nvfp4Weights, WeightData, E4M3_MAX,
};

use crate::codec::{f32_to_e2m1, f32_to_e4m3};
use crate::{QuantError, Result};

/// The stored format of one quantized weight matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum WeightFormat {
    /// int8, one scale (and offset with a zero point) per `group` values of a row
    /// (`group == cols`: per channel).
    Int8 {
        group: usize,
        #[serde(default)]
        zero_point: bool,
    },
    /// 4-bit, one scale (and offset with a zero point) per `group` values.
    Int4 { group: usize, zero_point: bool },
    /// FP8 E4M3, one scale per row.
    Fp8,
    /// E2M1 values, an E4M3 scale per 16 values, an f32 global scale.
    Nvfp4,
    /// int8 per channel; activations are quantized per token at run time.
    W8A8,
}

impl WeightFormat {
    /// Values per block: the columns of a matrix must be a multiple of it.
    pub fn block(self) -> usize {
        match self {
            WeightFormat::Nvfp4 => 16,
            _ => 32,
        }
    }

    /// Bytes of codes per row.
    pub fn code_bytes(self, cols: usize) -> usize {
        match self {
            WeightFormat::Int4 { .. } | WeightFormat::Nvfp4 => cols / 2,
            _ => cols,
        }
    }

    /// f32 scales per row (NVFP4 keeps its block scales as bytes instead).
    pub fn scales_per_row(self, cols: usize) -> usize {
        match self {
            WeightFormat::Int8 { group, .. } | WeightFormat::Int4 { group, .. } => {
                cols.div_ceil(group)
            }
            WeightFormat::Fp8 | WeightFormat::W8A8 => 1,
            WeightFormat::Nvfp4 => 0,
        }
    }

    pub fn describe(self) -> String {
        match self {
            WeightFormat::Int8 { group, zero_point } | WeightFormat::Int4 { group, zero_point } => {
                let bits = if matches!(self, WeightFormat::Int8 { .. }) {
                    8
                } else {
                    4
                };
                format!("int{bits} g{group}{}", if zero_point { " zp" } else { "" })
            }
            WeightFormat::Fp8 => "fp8 e4m3".into(),
            WeightFormat::Nvfp4 => "nvfp4".into(),
            WeightFormat::W8A8 => "w8a8".into(),
        }
    }

    /// Whether the format stores an offset per group beside its scale.
    pub fn has_offsets(self) -> bool {
        matches!(
            self,
            WeightFormat::Int8 {
                zero_point: true,
                ..
            } | WeightFormat::Int4 {
                zero_point: true,
                ..
            }
        )
    }

    /// Whether a `cols`-wide matrix can be stored in this format.
    pub fn check_cols(self, cols: usize) -> Result<()> {
        if cols.is_multiple_of(self.block()) {
            Ok(())
        } else {
            Err(QuantError::Shape(format!(
                "{} needs in_features to be a multiple of {}, got {cols}",
                self.describe(),
                self.block()
            )))
        }
    }
}

/// A quantized matrix owned in memory (what the builder writes).
#[derive(Clone, Debug, PartialEq)]
pub struct PackedWeight {
    pub format: WeightFormat,
    pub rows: usize,
    pub cols: usize,
    pub codes: Vec<u8>,
    pub scales: Vec<f32>,
    pub offsets: Option<Vec<f32>>,
    pub block_scales: Vec<u8>,
    pub global_scale: f32,
    /// Column `j` holds input column `input_perm[j]` (GPTQ act-order, whose groups are runs of
    /// columns only in this order); the activations are gathered the same way before the
    /// product.
    pub input_perm: Option<Vec<u32>>,
}

/// A quantized matrix borrowed from storage (what the runtime reads).
#[derive(Clone, Copy, Debug)]
pub struct PackedRef<'a> {
    pub format: WeightFormat,
    pub codes: &'a [u8],
    pub scales: &'a [f32],
    pub offsets: Option<&'a [f32]>,
    pub block_scales: &'a [u8],
    pub global_scale: f32,
}

impl<'a> PackedRef<'a> {
    /// The kernels' view; shapes are checked when it becomes a `MatRef`.
    pub fn view(&self) -> WeightData<'a> {
        let i8s: &[i8] = bytemuck::cast_slice(self.codes);
        match self.format {
            WeightFormat::Int8 { group, .. } => WeightData::Int8(Int8Weights {
                q: i8s,
                scales: self.scales,
                offsets: self.offsets,
                group,
            }),
            WeightFormat::W8A8 => WeightData::W8A8(Int8Weights {
                q: i8s,
                scales: self.scales,
                offsets: None,
                group: self.codes.len() / self.scales.len().max(1),
            }),
            WeightFormat::Int4 { group, .. } => WeightData::Int4(Int4Weights {
                q: self.codes,
                scales: self.scales,
                offsets: self.offsets,
                group,
            }),
            WeightFormat::Fp8 => WeightData::Fp8(Fp8Weights {
                q: self.codes,
                scales: self.scales,
            }),
            WeightFormat::Nvfp4 => WeightData::Nvfp4(Nvfp4Weights {
                q: self.codes,
                block_scales: self.block_scales,
                global_scale: self.global_scale,
            }),
        }
    }
}

impl PackedWeight {
    pub fn as_ref(&self) -> PackedRef<'_> {
        PackedRef {
            format: self.format,
            codes: &self.codes,
            scales: &self.scales,
            offsets: self.offsets.as_deref(),
            block_scales: &self.block_scales,
            global_scale: self.global_scale,
        }
    }

    /// The matrix the codes stand for, its columns in input order.
    pub fn dequantize(&self) -> Result<Vec<f32>> {
        let m = trtllm_kernels::cpu::MatRef::new(self.as_ref().view(), self.rows, self.cols)?;
        let mut out = vec![0f32; self.rows * self.cols];
        let mut row = vec![0f32; self.cols];
        for (r, dst) in out.chunks_exact_mut(self.cols).enumerate() {
            m.row_to_f32(r, &mut row);
            match &self.input_perm {
                Some(perm) => perm
                    .iter()
                    .zip(&row)
                    .for_each(|(&c, &v)| dst[c as usize] = v),
                None => dst.copy_from_slice(&row),
            }
        }
        Ok(out)
    }

    /// Stored bytes (codes and scales).
    pub fn stored_bytes(&self) -> usize {
        self.codes.len()
            + 4 * (self.scales.len() + self.offsets.as_ref().map_or(0, Vec::len))
            + self.block_scales.len()
            + 4 * self.input_perm.as_ref().map_or(0, Vec::len)
    }

    /// A `rows × cols` matrix of `format` with nothing in it yet.
    pub fn empty(format: WeightFormat, rows: usize, cols: usize) -> Self {
        Self {
            format,
            rows,
            cols,
            codes: Vec::with_capacity(rows * format.code_bytes(cols)),
            scales: Vec::with_capacity(rows * format.scales_per_row(cols)),
            offsets: None,
            block_scales: Vec::new(),
            global_scale: 1.0,
            input_perm: None,
        }
    }

    /// Appends one 32-value int4 block in GGML's layout: byte `i` holds `value(i)` in its low
    /// nibble and `value(i + 16)` in its high one (values are 0..15).
    pub fn push_int4_block(&mut self, value: impl Fn(usize) -> u8) {
        self.codes
            .extend((0..16).map(|i| value(i) | (value(i + 16) << 4)));
    }
}

/// Scale and offset of one int group: `value = scale · code + offset`, codes in
/// `min_code..=max_code` (int8: ±127; int4: 0..15, symmetric ones centred on 8).
#[derive(Clone, Copy, Debug)]
pub struct GroupParams {
    pub scale: f32,
    pub offset: f32,
    min_code: f32,
    max_code: f32,
}

impl GroupParams {
    /// Round-to-nearest parameters covering `values`.
    pub fn fit(values: &[f32], bits: u32, zero_point: bool) -> Self {
        let (lo, hi) = values
            .iter()
            .fold((0f32, 0f32), |(l, h), &v| (l.min(v), h.max(v)));
        let tiny = f32::MIN_POSITIVE * 1e4;
        let amax = lo.abs().max(hi.abs());
        match (bits, zero_point) {
            (4, true) => Self {
                scale: ((hi - lo) / 15.0).max(tiny),
                offset: lo,
                min_code: 0.0,
                max_code: 15.0,
            },
            (4, false) => {
                let scale = (amax / 7.0).max(tiny);
                Self {
                    scale,
                    offset: -8.0 * scale,
                    min_code: 0.0,
                    max_code: 15.0,
                }
            }
            _ => Self {
                scale: (amax / 127.0).max(tiny),
                offset: 0.0,
                min_code: -127.0,
                max_code: 127.0,
            },
        }
    }

    /// The nearest code of `v`.
    pub fn code(&self, v: f32) -> f32 {
        ((v - self.offset) / self.scale)
            .round()
            .clamp(self.min_code, self.max_code)
    }

    /// The value `code` stands for.
    pub fn value(&self, code: f32) -> f32 {
        self.scale * code + self.offset
    }
}

/// Packs rows of int codes chosen by `choose(row, group_start, group_values) -> (params, codes)`.
/// Shared by RTN and GPTQ (which chooses codes with error feedback).
pub fn pack_int(
    format: WeightFormat,
    rows: usize,
    cols: usize,
    mut codes_of: impl FnMut(usize) -> Vec<(GroupParams, Vec<f32>)>,
) -> Result<PackedWeight> {
    format.check_cols(cols)?;
    let mut p = PackedWeight::empty(format, rows, cols);
    let zero_point = matches!(
        format,
        WeightFormat::Int4 {
            zero_point: true,
            ..
        }
    );
    let mut offsets = Vec::new();
    for r in 0..rows {
        let mut row_codes = Vec::with_capacity(cols);
        for (params, codes) in codes_of(r) {
            p.scales.push(params.scale);
            offsets.push(params.offset);
            row_codes.extend(codes);
        }
        match format {
            WeightFormat::Int4 { .. } => {
                for block in row_codes.chunks_exact(32) {
                    p.push_int4_block(|i| block[i] as u8);
                }
            }
            _ => p.codes.extend(row_codes.iter().map(|&c| c as i8 as u8)),
        }
    }
    if zero_point {
        p.offsets = Some(offsets);
    }
    Ok(p)
}

/// Round-to-nearest quantization of `w` (`rows × cols`) into `format`.
pub fn quantize_rtn(
    format: WeightFormat,
    w: &[f32],
    rows: usize,
    cols: usize,
) -> Result<PackedWeight> {
    format.check_cols(cols)?;
    let group = match format {
        WeightFormat::Int8 { group, .. } | WeightFormat::Int4 { group, .. } => group.min(cols),
        WeightFormat::W8A8 => cols,
        WeightFormat::Fp8 => return Ok(quantize_fp8(w, rows, cols)),
        WeightFormat::Nvfp4 => return Ok(quantize_nvfp4(w, rows, cols)),
    };
    let (bits, zp) = match format {
        WeightFormat::Int4 { zero_point, .. } => (4, zero_point),
        _ => (8, false),
    };
    pack_int(format, rows, cols, |r| {
        w[r * cols..(r + 1) * cols]
            .chunks(group)
            .map(|g| {
                let params = GroupParams::fit(g, bits, zp);
                (params, g.iter().map(|&v| params.code(v)).collect())
            })
            .collect()
    })
}

/// FP8 E4M3 with a per-row scale mapping the row's largest magnitude to 448.
fn quantize_fp8(w: &[f32], rows: usize, cols: usize) -> PackedWeight {
    let mut p = PackedWeight::empty(WeightFormat::Fp8, rows, cols);
    for row in w.chunks_exact(cols).take(rows) {
        let amax = row.iter().fold(0f32, |a, v| a.max(v.abs()));
        let s = if amax > 0.0 { amax / E4M3_MAX } else { 1.0 };
        p.scales.push(s);
        p.codes.extend(row.iter().map(|&v| f32_to_e4m3(v / s)));
    }
    p
}

/// NVFP4: the global scale maps the tensor's largest magnitude to 6 · 448, each 16-value block's
/// E4M3 scale maps the block's largest magnitude to 6.
fn quantize_nvfp4(w: &[f32], rows: usize, cols: usize) -> PackedWeight {
    let mut p = PackedWeight::empty(WeightFormat::Nvfp4, rows, cols);
    let amax = w.iter().fold(0f32, |a, v| a.max(v.abs()));
    p.global_scale = if amax > 0.0 {
        amax / (6.0 * E4M3_MAX)
    } else {
        1.0
    };
    for block in w[..rows * cols].chunks_exact(16) {
        let bmax = block.iter().fold(0f32, |a, v| a.max(v.abs()));
        let code = f32_to_e4m3(bmax / 6.0 / p.global_scale);
        p.block_scales.push(code);
        let s = trtllm_kernels::cpu::e4m3_to_f32(code) * p.global_scale;
        let q: Vec<u8> = block
            .iter()
            .map(|&v| if s > 0.0 { f32_to_e2m1(v / s) } else { 0 })
            .collect();
        p.codes.extend((0..8).map(|i| q[i] | (q[i + 8] << 4)));
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5 + (i % 13) as f32 * 0.01)
            .collect()
    }

    fn max_err(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
    }

    #[test]
    fn rtn_error_is_within_half_a_step_for_every_format() {
        let (rows, cols) = (5, 96);
        let w = sample(rows * cols);
        let amax = 0.62;
        for (format, step) in [
            (
                WeightFormat::Int8 {
                    group: 32,
                    zero_point: false,
                },
                2.0 * amax / 254.0,
            ),
            (WeightFormat::W8A8, 2.0 * amax / 254.0),
            (
                WeightFormat::Int4 {
                    group: 64,
                    zero_point: true,
                },
                2.0 * amax / 15.0,
            ),
            (
                WeightFormat::Int4 {
                    group: 32,
                    zero_point: false,
                },
                amax / 7.0,
            ),
            // E4M3's top binade [256, 448] has steps of 32.
            (WeightFormat::Fp8, amax * 32.0 / 448.0),
            (WeightFormat::Nvfp4, amax / 3.0),
        ] {
            let p = quantize_rtn(format, &w, rows, cols).unwrap();
            assert_eq!(p.codes.len(), rows * format.code_bytes(cols));
            let back = p.dequantize().unwrap();
            let err = max_err(&back, &w);
            assert!(
                err <= step / 2.0 + 1e-6,
                "{format:?}: error {err} > {}",
                step / 2.0
            );
        }
        assert!(quantize_rtn(
            WeightFormat::Int8 {
                group: 32,
                zero_point: false,
            },
            &w[..40],
            1,
            40
        )
        .is_err());
    }

    #[test]
    fn formats_serialize_with_a_kind_tag() {
        let f = WeightFormat::Int4 {
            group: 128,
            zero_point: true,
        };
        let s = serde_json::to_string(&f).unwrap();
        assert_eq!(s, r#"{"kind":"int4","group":128,"zero_point":true}"#);
        assert_eq!(serde_json::from_str::<WeightFormat>(&s).unwrap(), f);
    }
}
