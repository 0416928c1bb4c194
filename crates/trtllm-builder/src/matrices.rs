//! Where a build's matrices go: float in the engine's dtype, packed by the quantizer, or packed
//! as the checkpoint stored them (`keep`); the parts of fused layers stacked into one matrix.

use trtllm_runtime::engine::{names, EngineWriter};
use trtllm_runtime::quant::{DType, PackedWeight, Quantizer};
use trtllm_runtime::{LoraAdapter, LoraFactors, LoraModule};

use crate::family::LinearSpec;
use crate::{BuildError, Checkpoint, Result};

/// The adapter's factors for engine module `layers.{i}.{part}`, if it changes it (never an
/// expert's MLP: adapters refuse those).
fn merged_factors<'a>(adapter: &'a LoraAdapter, module: &str) -> Option<&'a LoraFactors> {
    let (layer, part) = module.strip_prefix("layers.")?.split_once('.')?;
    let m = match part {
        names::QKV => LoraModule::Qkv,
        names::O => LoraModule::O,
        names::GATE_UP | names::UP => LoraModule::Up,
        names::DOWN => LoraModule::Down,
        _ => return None,
    };
    adapter.layers.get(layer.parse::<usize>().ok()?)?.get(&m)
}

/// Where matrices go: float in `dtype`, packed by the quantizer, or packed as the checkpoint
/// stored them (`keep`).
pub(crate) struct Out<'a> {
    pub ck: &'a dyn Checkpoint,
    pub w: EngineWriter,
    pub dtype: DType,
    pub quantizer: Quantizer<'a>,
    pub keep: bool,
    /// A LoRA adapter to merge into the linear layers it changes.
    pub merge: Option<&'a LoraAdapter>,
}

impl Out<'_> {
    /// A plain matrix stacked from checkpoint tensors `srcs`, written as `{prefix}.weight`;
    /// `module` names it to the quantizer (None: never quantized).
    pub fn matrix(
        &mut self,
        srcs: &[&str],
        prefix: &str,
        module: Option<&str>,
        shape: [usize; 2],
    ) -> Result<()> {
        if self.keep {
            // Embedding rows are gathered as stored, so their columns must be in input order.
            let kept = self.kept(srcs.iter().map(|s| (*s, None)), shape)?;
            if let Some(p) = kept.filter(|p| p.input_perm.is_none()) {
                return Ok(self.w.add_packed(prefix, &p)?);
            }
        }
        let t = self.ck.require(srcs[0])?;
        check_shape(self.ck, srcs[0], &t.shape, &shape)?;
        self.weight(prefix, module, t.data, shape)
    }

    pub fn linear(
        &mut self,
        module: &str,
        lin: &LinearSpec,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        let kept = match self.keep && lin.iter().all(|p| !p.transposed) {
            true => self.kept(
                lin.iter().map(|p| (p.weight.as_str(), p.unpermute_heads)),
                [rows, cols],
            )?,
            false => None,
        };
        let (mut weight, bias) = linear(self.ck, lin, rows, cols, kept.is_none())?;
        if let Some(f) = self.merge.and_then(|a| merged_factors(a, module)) {
            // W += B·A: row r gains Σ_j B[r][j] · A[j].
            for (r, row) in weight.chunks_exact_mut(cols).enumerate() {
                for (j, a) in f.a.chunks_exact(cols).enumerate() {
                    let b = f.b[r * f.rank + j];
                    row.iter_mut().zip(a).for_each(|(w, a)| *w += b * a);
                }
            }
        }
        match kept {
            Some(p) => self.w.add_packed(module, &p)?,
            None => self.weight(module, Some(module), weight, [rows, cols])?,
        }
        if let Some(b) = bias {
            let name = format!("{module}.bias");
            self.w
                .add(&name, DType::F32, &[rows], &DType::F32.encode(&b))?;
        }
        Ok(())
    }

    fn weight(
        &mut self,
        prefix: &str,
        module: Option<&str>,
        data: Vec<f32>,
        shape: [usize; 2],
    ) -> Result<()> {
        let [rows, cols] = shape;
        let q = match module {
            Some(m) => self.quantizer.quantize(m, &data, rows, cols)?,
            None => None,
        };
        let Some(q) = q else {
            let name = format!("{prefix}.weight");
            return Ok(self
                .w
                .add(&name, self.dtype, &shape, &self.dtype.encode(&data))?);
        };
        self.w.add_packed(prefix, &q.weight)?;
        if let Some(s) = &q.pre_quant_scale {
            let name = format!("{prefix}.pre_quant_scale");
            self.w
                .add(&name, DType::F32, &[cols], &DType::F32.encode(s))?;
        }
        if let Some(s) = q.input_scale {
            let name = format!("{prefix}.input_scale");
            self.w
                .add(&name, DType::F32, &[1], &DType::F32.encode(&[s]))?;
        }
        Ok(())
    }

    /// The checkpoint's own packed parts stacked into one `rows × cols` matrix, when every part
    /// is stored in the same packed format and reads its input in the same order (otherwise
    /// None: the float path is lossless too). Act-order GPTQ parts that read one input (q, k and
    /// v) share the order of that input's Hessian, so they stack.
    fn kept<'s>(
        &self,
        parts: impl Iterator<Item = (&'s str, Option<usize>)>,
        [rows, cols]: [usize; 2],
    ) -> Result<Option<PackedWeight>> {
        let mut stacked: Option<PackedWeight> = None;
        for (name, heads) in parts {
            let Some(mut p) = self.ck.packed(name)? else {
                return Ok(None);
            };
            if p.cols != cols {
                return Err(BuildError::TensorShape {
                    path: self.ck.path().into(),
                    name: name.into(),
                    expected: vec![0, cols],
                    got: vec![p.rows, p.cols],
                });
            }
            if let Some(heads) = heads {
                unpermute_packed(&mut p, heads);
            }
            match &mut stacked {
                None => stacked = Some(p),
                Some(s) if s.format == p.format && s.input_perm == p.input_perm => {
                    s.rows += p.rows;
                    s.codes.extend(p.codes);
                    s.scales.extend(p.scales);
                    if let (Some(a), Some(b)) = (s.offsets.as_mut(), p.offsets) {
                        a.extend(b);
                    }
                }
                Some(_) => return Ok(None),
            }
        }
        Ok(stacked.filter(|s| s.rows == rows))
    }
}

/// [`unpermute_rows`] for a packed matrix: codes, scales and offsets move with their row.
fn unpermute_packed(p: &mut PackedWeight, heads: usize) {
    let code_row = p.format.code_bytes(p.cols);
    let spr = p.format.scales_per_row(p.cols);
    p.codes = unpermute_rows(&p.codes, heads, code_row);
    p.scales = unpermute_rows(&p.scales, heads, spr);
    if let Some(o) = &p.offsets {
        p.offsets = Some(unpermute_rows(o, heads, spr));
    }
}

pub(crate) fn check_shape(
    ck: &dyn Checkpoint,
    name: &str,
    got: &[usize],
    expected: &[usize],
) -> Result<()> {
    if got == expected {
        Ok(())
    } else {
        Err(BuildError::TensorShape {
            path: ck.path().into(),
            name: name.into(),
            expected: expected.into(),
            got: got.into(),
        })
    }
}

/// Stacks the parts of a fused linear layer into `[rows × cols]` plus a bias if any part has one.
/// With `weights` false only the bias is assembled (the weight comes packed from elsewhere).
fn linear(
    ck: &dyn Checkpoint,
    parts: &LinearSpec,
    rows: usize,
    cols: usize,
    weights: bool,
) -> Result<(Vec<f32>, Option<Vec<f32>>)> {
    // Grown from the tensors read (their sizes come from the file), never sized by the config
    // alone: a corrupt config's shape is an error below, not a terabyte allocation.
    let mut weight = Vec::new();
    let mut bias: Vec<f32> = Vec::new();
    let mut any_bias = false;
    for p in parts {
        if !weights {
            let b = ck.tensor(&p.bias)?;
            any_bias |= b.is_some();
            let b = match b {
                Some(b) => b.data,
                None => {
                    let out = ck.packed(&p.weight)?.map_or(0, |w| w.rows);
                    vec![0.0; out]
                }
            };
            bias.extend(match p.unpermute_heads {
                Some(heads) => unpermute_rows(&b, heads, 1),
                None => b,
            });
            continue;
        }
        let t = ck.require(&p.weight)?;
        if t.shape.len() != 2 {
            return Err(BuildError::TensorShape {
                path: ck.path().into(),
                name: p.weight.clone(),
                expected: vec![0, cols],
                got: t.shape,
            });
        }
        let (mut data, out) = if p.transposed {
            check_shape(ck, &p.weight, &t.shape[..1], &[cols])?;
            (transpose(&t.data, t.shape[0], t.shape[1]), t.shape[1])
        } else {
            check_shape(ck, &p.weight, &t.shape[1..], &[cols])?;
            (t.data, t.shape[0])
        };
        let mut b = match ck.tensor(&p.bias)? {
            Some(b) => {
                check_shape(ck, &p.bias, &b.shape, &[out])?;
                any_bias = true;
                b.data
            }
            None => vec![0.0; out],
        };
        if let Some(heads) = p.unpermute_heads {
            data = unpermute_rows(&data, heads, cols);
            b = unpermute_rows(&b, heads, 1);
        }
        weight.extend(data);
        bias.extend(b);
    }
    if weights && weight.len() != rows * cols {
        let name = parts
            .iter()
            .map(|p| p.weight.as_str())
            .collect::<Vec<_>>()
            .join(" + ");
        return Err(BuildError::TensorShape {
            path: ck.path().into(),
            name,
            expected: vec![rows, cols],
            got: vec![weight.len() / cols, cols],
        });
    }
    Ok((weight, any_bias.then_some(bias)))
}

fn transpose(data: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; data.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = data[r * cols + c];
        }
    }
    out
}

/// Undoes llama.cpp's rotary permutation: within each head, row `2i + s` of the file is row
/// `s·(head_dim/2) + i` of the original.
fn unpermute_rows<T: Copy + Default>(data: &[T], heads: usize, cols: usize) -> Vec<T> {
    let rows = data.len() / cols;
    let head_dim = rows / heads;
    let half = head_dim / 2;
    let mut out = vec![T::default(); data.len()];
    for h in 0..heads {
        for i in 0..half {
            for s in 0..2 {
                let src = h * head_dim + 2 * i + s;
                let dst = h * head_dim + s * half + i;
                out[dst * cols..(dst + 1) * cols]
                    .copy_from_slice(&data[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_llama_cpp_permutation() {
        // One head of dim 4 with 1 column: original rows [0,1,2,3] → llama.cpp writes [0,2,1,3].
        assert_eq!(
            unpermute_rows(&[0.0, 2.0, 1.0, 3.0], 1, 1),
            vec![0.0, 1.0, 2.0, 3.0]
        );
        assert_eq!(
            transpose(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 2, 3),
            vec![1.0, 4.0, 2.0, 5.0, 3.0, 6.0]
        );
    }
}
