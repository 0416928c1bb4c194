//! Hugging Face checkpoints published already quantized (`quantization_config` in config.json):
//! GPTQ, AWQ (GEMM packing) and FP8 (compressed-tensors, ModelOpt), read into the engine's
//! packed formats as stored, without requantizing: int4/int8 groups stay the checkpoint's
//! groups and codes, FP8 codes stay FP8 with their scales.
//!
//! Layouts, from the loaders that define them (AutoGPTQ/GPTQModel, AutoAWQ, vLLM):
//! - GPTQ: `qweight` int32 `[in·bits/32, out]`, value `j` of a word at bits `bits·j` along the
//!   input; `qzeros` int32 `[groups, out·bits/32]` packed along the output, stored minus one
//!   unless `checkpoint_format` is `gptq_v2`; `scales` `[groups, out]`; `g_idx` `[in]`, the group
//!   of each input column. `w = scale · (q − zero)`.
//! - AWQ (GEMM): `qweight` int32 `[in, out/8]` and `qzeros` `[groups, out/8]` packed along the
//!   output with nibble `j` holding column `ORDER[j]` of each run of 8; `w = (q − zero) · scale`.
//! - FP8: `weight` F8_E4M3 `[out, in]` with `weight_scale` per tensor or per output channel.

use std::path::Path;

use serde_json::Value;
use trtllm_runtime::quant::{PackedWeight, WeightFormat};

use crate::checkpoint::SafetensorsCheckpoint;
use crate::{BuildError, Checkpoint, Result};

/// What `quantization_config` may name.
const SUPPORTED: &str = "gptq (4 or 8 bits), awq (4 bits, GEMM packing), compressed-tensors \
                         (float-quantized FP8), modelopt (FP8)";

/// AWQ's GEMM packing: nibble `j` of a word holds column `AWQ_ORDER[j]` of its run of 8.
const AWQ_ORDER: [usize; 8] = [0, 2, 4, 6, 1, 3, 5, 7];

/// How a checkpoint's linear weights are stored quantized.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PreQuant {
    Gptq {
        bits: u32,
        sym: bool,
        /// Zeros stored minus one (AutoGPTQ's original format).
        zeros_minus_one: bool,
    },
    Awq,
    Fp8,
}

impl PreQuant {
    /// The checkpoint's `quantization_config`, if it has one (config.json at `path`).
    pub fn parse(config: &Value, path: &Path) -> Result<Option<Self>> {
        let Some(q) = config.get("quantization_config").filter(|v| !v.is_null()) else {
            return Ok(None);
        };
        let field = |k: &str| q.get(k).filter(|v| !v.is_null());
        let invalid = |k: &str, message: String| BuildError::InvalidField {
            path: path.into(),
            field: format!("quantization_config.{k}"),
            message,
        };
        let method = field("quant_method").and_then(Value::as_str).unwrap_or("");
        let bits = field("bits").and_then(Value::as_u64).unwrap_or(4) as u32;
        match method {
            "gptq" => {
                if !matches!(bits, 4 | 8) {
                    return Err(invalid(
                        "bits",
                        format!("GPTQ with {bits} bits is not supported (4 or 8)"),
                    ));
                }
                let format = field("checkpoint_format").and_then(Value::as_str);
                Ok(Some(PreQuant::Gptq {
                    bits,
                    sym: field("sym").and_then(Value::as_bool).unwrap_or(true),
                    zeros_minus_one: format != Some("gptq_v2"),
                }))
            }
            "awq" => {
                let version = field("version").and_then(Value::as_str).unwrap_or("gemm");
                if bits != 4 || !version.eq_ignore_ascii_case("gemm") {
                    return Err(invalid(
                        "version",
                        format!("AWQ {bits}-bit '{version}' is not supported (4-bit GEMM packing)"),
                    ));
                }
                if field("zero_point").and_then(Value::as_bool) == Some(false) {
                    return Err(invalid(
                        "zero_point",
                        "AWQ without zero points is not supported".into(),
                    ));
                }
                Ok(Some(PreQuant::Awq))
            }
            "compressed-tensors" => {
                let format = field("format").and_then(Value::as_str).unwrap_or("");
                if format != "float-quantized" {
                    return Err(invalid(
                        "format",
                        format!("compressed-tensors format '{format}' is not supported (float-quantized FP8)"),
                    ));
                }
                Ok(Some(PreQuant::Fp8))
            }
            "modelopt" | "fp8" if field("quant_algo").and_then(Value::as_str) == Some("FP8") => {
                Ok(Some(PreQuant::Fp8))
            }
            other => Err(invalid(
                "quant_method",
                format!("'{other}' is not supported (supported: {SUPPORTED})"),
            )),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            PreQuant::Gptq { bits, sym, .. } => {
                format!(
                    "GPTQ {bits}-bit{}",
                    if *sym { "" } else { " with zero points" }
                )
            }
            PreQuant::Awq => "AWQ 4-bit".into(),
            PreQuant::Fp8 => "FP8 E4M3 (weights only: activations stay float)".into(),
        }
    }

    /// `{prefix}.weight` in the engine's packed format, as the checkpoint stores it; None when
    /// that weight is not quantized (an excluded module, the embeddings).
    pub(crate) fn packed(
        &self,
        ck: &SafetensorsCheckpoint,
        prefix: &str,
    ) -> Result<Option<PackedWeight>> {
        match *self {
            PreQuant::Gptq {
                bits,
                sym,
                zeros_minus_one,
            } => {
                let per = 32 / bits as usize;
                let Some((g, qweight, qzeros)) = read_packed(ck, prefix, per, true)? else {
                    return Ok(None);
                };
                let perm = check_groups(ck, prefix, &g)?;
                let mask = (1u32 << bits) - 1;
                let stored = |r: usize, c: usize| {
                    (qweight.data[(c / per) * g.rows + r] >> (bits as usize * (c % per))) & mask
                };
                let zero = |gi: usize, r: usize| {
                    let z = (qzeros.data[gi * g.rows / per + r / per]
                        >> (bits as usize * (r % per)))
                        & mask;
                    z + zeros_minus_one as u32
                };
                // Column j of the packed weight is input column perm[j], in group j / group.
                let col = |j: usize| perm.as_ref().map_or(j, |p| p[j] as usize);
                let code = |r: usize, j: usize| stored(r, col(j));
                let mut p = g.pack(ck, prefix, bits, sym, code, zero)?;
                p.input_perm = perm;
                Ok(Some(p))
            }
            PreQuant::Awq => {
                let Some((g, qweight, qzeros)) = read_packed(ck, prefix, 8, false)? else {
                    return Ok(None);
                };
                if check_groups(ck, prefix, &g)?.is_some() {
                    return Err(BuildError::checkpoint(
                        ck.path(),
                        format!("tensor '{prefix}.g_idx': AWQ groups are runs of columns"),
                    ));
                }
                let nibble = |words: &[u32], row: usize, width: usize, r: usize| {
                    let j = AWQ_ORDER.iter().position(|&o| o == r % 8).unwrap_or(0);
                    (words[row * width / 8 + r / 8] >> (4 * j)) & 0xf
                };
                let code = |r: usize, c: usize| nibble(&qweight.data, c, g.rows, r);
                let zero = |gi: usize, r: usize| nibble(&qzeros.data, gi, g.rows, r);
                g.pack(ck, prefix, 4, false, code, zero).map(Some)
            }
            PreQuant::Fp8 => fp8(ck, prefix),
        }
    }
}

/// `{prefix}.qweight` and `{prefix}.qzeros` with the grid they imply, each checked against the
/// shape its layout gives it: `per` values a word, packed along the input (GPTQ's weights) or
/// the output (AWQ's weights; every layout's zeros). None when the weight is not packed.
fn read_packed(
    ck: &SafetensorsCheckpoint,
    prefix: &str,
    per: usize,
    along_input: bool,
) -> Result<Option<(Grid, Words, Words)>> {
    let Some(qweight) = ck.words(&format!("{prefix}.qweight"))? else {
        return Ok(None);
    };
    let first = qweight.shape.first().copied().unwrap_or(0);
    let g = Grid::read(ck, prefix, if along_input { first * per } else { first })?;
    let shape = match along_input {
        true => [g.cols / per, g.rows],
        false => [g.cols, g.rows / per],
    };
    g.check_words(ck, &format!("{prefix}.qweight"), &qweight, shape)?;
    let qzeros = ck.require_words(&format!("{prefix}.qzeros"))?;
    g.check_words(
        ck,
        &format!("{prefix}.qzeros"),
        &qzeros,
        [g.groups, g.rows / per],
    )?;
    Ok(Some((g, qweight, qzeros)))
}

/// Little-endian int32 words of a packed tensor, with its shape.
pub(crate) struct Words {
    pub shape: Vec<usize>,
    pub data: Vec<u32>,
}

/// The shape of a GPTQ/AWQ weight: `rows × cols` (out × in), and its scale groups.
struct Grid {
    rows: usize,
    cols: usize,
    groups: usize,
    /// `[groups × rows]`, as stored.
    scales: Vec<f32>,
    /// The group of each input column, where the checkpoint says (`g_idx`).
    g_idx: Option<Vec<u32>>,
}

impl Grid {
    /// The grid of a `cols`-wide weight, from its scales (`[groups, out]`) and `g_idx`.
    fn read(ck: &SafetensorsCheckpoint, prefix: &str, cols: usize) -> Result<Self> {
        let scales = ck.require(&format!("{prefix}.scales"))?;
        let [groups, rows] = scales.shape[..] else {
            return Err(shape_error(
                ck,
                &format!("{prefix}.scales"),
                &scales.shape,
                "[groups, out]",
            ));
        };
        let g_idx = ck.words(&format!("{prefix}.g_idx"))?.map(|w| w.data);
        Ok(Grid {
            rows,
            cols,
            groups,
            scales: scales.data,
            g_idx,
        })
    }

    /// A packed tensor must have exactly the shape the grid implies (its words are indexed
    /// without further checks).
    fn check_words(
        &self,
        ck: &SafetensorsCheckpoint,
        name: &str,
        w: &Words,
        want: [usize; 2],
    ) -> Result<()> {
        if w.shape != want || !self.rows.is_multiple_of(8) {
            return Err(shape_error(
                ck,
                name,
                &w.shape,
                &format!("{want:?} (out a multiple of 8)"),
            ));
        }
        Ok(())
    }

    /// Group size, when groups are runs of whole columns.
    fn group(&self) -> usize {
        self.cols / self.groups.max(1)
    }

    /// Codes `code(row, col)` and zeros `zero(group, row)` in the engine's int4 or int8 format
    /// with the checkpoint's groups: `scale · (q − zero)` as `scale · q + offset`, or without
    /// offsets when the checkpoint is symmetric (every zero the middle code).
    fn pack(
        &self,
        ck: &SafetensorsCheckpoint,
        prefix: &str,
        bits: u32,
        sym: bool,
        code: impl Fn(usize, usize) -> u32,
        zero: impl Fn(usize, usize) -> u32,
    ) -> Result<PackedWeight> {
        let (rows, cols, ng, group) = (self.rows, self.cols, self.groups, self.group());
        let mid = 1u32 << (bits - 1);
        let format = match bits {
            4 => WeightFormat::Int4 {
                group,
                zero_point: !sym,
            },
            _ => WeightFormat::Int8 {
                group,
                zero_point: !sym,
            },
        };
        let mut p = PackedWeight::empty(format, rows, cols);
        p.offsets = (!sym).then(|| Vec::with_capacity(rows * ng));
        for r in 0..rows {
            for gi in 0..ng {
                let (s, z) = (self.scales[gi * rows + r], zero(gi, r));
                p.scales.push(s);
                match p.offsets.as_mut() {
                    // int8 codes are stored less the middle code, so its offset adds it back.
                    Some(o) if bits == 8 => o.push(s * (mid as f32 - z as f32)),
                    Some(o) => o.push(-(s * z as f32)),
                    None if z != mid => {
                        return Err(BuildError::checkpoint(
                            ck.path(),
                            format!("tensor '{prefix}.qzeros': symmetric (sym) but group {gi} of row {r} has zero point {z}, not {mid}"),
                        ))
                    }
                    None => {}
                }
            }
            if bits == 4 {
                for b in 0..cols / 32 {
                    p.push_int4_block(|i| code(r, b * 32 + i) as u8);
                }
            } else {
                p.codes
                    .extend((0..cols).map(|c| (code(r, c) as i32 - mid as i32) as i8 as u8));
            }
        }
        Ok(p)
    }
}

/// The checkpoint's groups must be of a size the kernels read, and runs of columns, or runs once
/// the columns are reordered (act-order): then the order, as `PackedWeight::input_perm`.
fn check_groups(ck: &SafetensorsCheckpoint, prefix: &str, g: &Grid) -> Result<Option<Vec<u32>>> {
    let group = g.group();
    if g.groups == 0 || !g.cols.is_multiple_of(g.groups) || !g.cols.is_multiple_of(32) {
        return Err(BuildError::checkpoint(
            ck.path(),
            format!("tensor '{prefix}': {} input columns in {} groups (a multiple of 32 in equal groups is needed)", g.cols, g.groups),
        ));
    }
    if group != 16 && !group.is_multiple_of(32) {
        return Err(BuildError::checkpoint(
            ck.path(),
            format!(
                "tensor '{prefix}': group size {group} is not supported (16 or a multiple of 32)"
            ),
        ));
    }
    if let Some(g_idx) = &g.g_idx {
        if g_idx.len() != g.cols {
            return Err(shape_error(
                ck,
                &format!("{prefix}.g_idx"),
                &[g_idx.len()],
                "[in]",
            ));
        }
        if g_idx
            .iter()
            .enumerate()
            .any(|(c, &gi)| gi as usize != c / group)
        {
            // Act-order: the columns sorted by group (stable) make each group a run.
            let mut perm: Vec<u32> = (0..g.cols as u32).collect();
            perm.sort_by_key(|&c| g_idx[c as usize]);
            let runs = perm
                .iter()
                .enumerate()
                .all(|(j, &c)| g_idx[c as usize] as usize == j / group);
            if !runs {
                return Err(BuildError::checkpoint(
                    ck.path(),
                    format!("tensor '{prefix}.g_idx': groups of unequal size ({} columns in groups of {group} expected)", g.cols),
                ));
            }
            return Ok(Some(perm));
        }
    }
    Ok(None)
}

fn fp8(ck: &SafetensorsCheckpoint, prefix: &str) -> Result<Option<PackedWeight>> {
    let name = format!("{prefix}.weight");
    let Some(raw) = ck.raw(&name)? else {
        return Ok(None);
    };
    if raw.dtype != safetensors::Dtype::F8_E4M3 {
        return Ok(None);
    }
    let [rows, cols] = raw.shape[..] else {
        return Err(shape_error(ck, &name, &raw.shape, "[out, in]"));
    };
    let scale = ck.require(&format!("{prefix}.weight_scale"))?;
    let scales = match scale.data.len() {
        1 => vec![scale.data[0]; rows],
        n if n == rows => scale.data,
        _ => {
            return Err(shape_error(
                ck,
                &format!("{prefix}.weight_scale"),
                &scale.shape,
                "one per tensor or per output channel",
            ))
        }
    };
    WeightFormat::Fp8.check_cols(cols)?;
    let mut p = PackedWeight::empty(WeightFormat::Fp8, rows, cols);
    p.codes.extend_from_slice(raw.data);
    p.scales = scales;
    Ok(Some(p))
}

fn shape_error(ck: &SafetensorsCheckpoint, name: &str, got: &[usize], want: &str) -> BuildError {
    BuildError::checkpoint(
        ck.path(),
        format!("tensor '{name}' has shape {got:?}, expected {want}"),
    )
}
