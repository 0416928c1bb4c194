//! `build()`: checkpoint → engine directory.

use std::path::Path;

use trtllm_runtime::engine::{names, EngineConfig, EngineWriter};
use trtllm_runtime::quant::{Calibration, DType, PackedWeight, QuantAlgo, Quantizer, LM_HEAD};
use trtllm_runtime::{BuildConfig, ModelConfig, PositionKind};

use crate::calibrate::{calibrate, CalibrationInput};
use crate::checkpoint::SafetensorsCheckpoint;
use crate::family::{self, LinearSpec, ModelSpec, NormSpec};
use crate::gguf::GgufFile;
use crate::{gguf_tokenizer, hf_config, BuildError, Checkpoint, Result};

/// Called as `progress(done, total, what)` while the build runs.
pub type BuildProgress<'a> = &'a mut dyn FnMut(usize, usize, &str);

/// Tokenizer and generation files carried from a Hugging Face directory into the engine.
const CARRIED_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
];

/// Builds an engine from `checkpoint` (a Hugging Face directory or a `.gguf` file) into `output`.
pub fn build(
    checkpoint: &Path,
    output: &Path,
    config: &BuildConfig,
    progress: BuildProgress,
) -> Result<EngineConfig> {
    if !checkpoint.exists() {
        return Err(BuildError::io(
            checkpoint,
            std::io::Error::new(std::io::ErrorKind::NotFound, "checkpoint not found"),
        ));
    }
    // Before calibration, which takes a while: a bad config fails at once.
    config.quant.validate()?;
    if checkpoint.is_dir() {
        let hf = hf_config::read(checkpoint)?;
        let mut model = hf.model;
        model.eos_token_ids = merge_generation_eos(checkpoint, model.eos_token_ids);
        let ck = SafetensorsCheckpoint::open(checkpoint, hf.dtype)?;
        let spec = family::hf_spec(hf.family, &model);
        let tok_path = checkpoint.join("tokenizer.json");
        let calibration = match config.quant.needs_calibration() {
            true => {
                let json = std::fs::read(&tok_path).map_err(|e| BuildError::io(&tok_path, e))?;
                let input = CalibrationInput {
                    tokenizer_json: &json,
                    tokenizer_path: &tok_path,
                };
                Some(calibrate(
                    &ck, &spec, &model, config, input, output, progress,
                )?)
            }
            false => None,
        };
        let engine = write_engine(
            &ck,
            &spec,
            model,
            config,
            output,
            calibration.as_ref(),
            progress,
        )?;
        for name in CARRIED_FILES {
            let src = checkpoint.join(name);
            if src.exists() {
                let dst = output.join(name);
                std::fs::copy(&src, &dst).map_err(|e| BuildError::io(&dst, e))?;
            }
        }
        Ok(engine)
    } else {
        let gguf = GgufFile::open(checkpoint)?;
        let (family, model) = gguf.model_config()?;
        let spec = family::gguf_spec(family, &model);
        let (tokenizer, tok_config) = gguf_tokenizer::convert(&gguf)?;
        let calibration = match config.quant.needs_calibration() {
            true => {
                let json = tokenizer.to_string();
                let input = CalibrationInput {
                    tokenizer_json: json.as_bytes(),
                    tokenizer_path: checkpoint,
                };
                Some(calibrate(
                    &gguf, &spec, &model, config, input, output, progress,
                )?)
            }
            false => None,
        };
        let engine = write_engine(
            &gguf,
            &spec,
            model,
            config,
            output,
            calibration.as_ref(),
            progress,
        )?;
        write_json(&output.join("tokenizer.json"), &tokenizer)?;
        write_json(&output.join("tokenizer_config.json"), &tok_config)?;
        Ok(engine)
    }
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    std::fs::write(path, v.to_string()).map_err(|e| BuildError::io(path, e))
}

/// generation_config.json may name more end-of-sequence tokens than config.json (Llama 3 does).
fn merge_generation_eos(dir: &Path, mut eos: Vec<u32>) -> Vec<u32> {
    let extra = std::fs::read_to_string(dir.join("generation_config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v.get("eos_token_id").cloned());
    let ids: Vec<u32> = match extra {
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64().map(|n| n as u32))
            .collect(),
        Some(v) => v.as_u64().map(|n| vec![n as u32]).unwrap_or_default(),
        None => Vec::new(),
    };
    for id in ids {
        if !eos.contains(&id) {
            eos.push(id);
        }
    }
    eos
}

/// The float type of the KV cache: as asked, else f32. Not the weights' 16-bit type by default
/// (vLLM's `auto`): the references are transformers in f32, and a bf16 cache moves tiny-llama's
/// logits by 6e-3 at the first position. A quantized cache takes no float type.
fn kv_cache_dtype(c: &BuildConfig) -> Result<DType> {
    let quantized = c.quant.base.kv_cache_quant_algo != QuantAlgo::NoQuant;
    match c.kv_cache_dtype {
        Some(DType::U8) => Err(BuildError::InvalidBuildConfig(
            "kv_cache_dtype uint8 is not a KV-cache type (float32, bfloat16 or float16; \
             --kv-cache-quant int8|fp8 for a quantized cache)"
                .into(),
        )),
        Some(d) if quantized && d != DType::F32 => Err(BuildError::InvalidBuildConfig(format!(
            "kv_cache_dtype {} and a quantized KV cache ({}) exclude each other",
            d.name(),
            c.quant.base.kv_cache_quant_algo
        ))),
        Some(d) => Ok(d),
        None => Ok(DType::F32),
    }
}

/// Fills in the limits left at 0 and rejects impossible ones.
fn resolve(
    config: &BuildConfig,
    model: &ModelConfig,
    native: Option<DType>,
) -> Result<BuildConfig> {
    let mut c = config.clone();
    c.dtype = Some(c.dtype.or(native).unwrap_or(DType::F32));
    c.kv_cache_dtype = Some(kv_cache_dtype(&c)?);
    if c.max_seq_len == 0 {
        c.max_seq_len = model.context_len();
    }
    if model.position == PositionKind::Learned && c.max_seq_len > model.max_position_embeddings {
        return Err(BuildError::InvalidBuildConfig(format!(
            "max_seq_len {} exceeds the model's {} learned positions",
            c.max_seq_len, model.max_position_embeddings
        )));
    }
    if c.max_seq_len < 2 {
        return Err(BuildError::InvalidBuildConfig(format!(
            "max_seq_len must be at least 2, got {}",
            c.max_seq_len
        )));
    }
    if c.max_input_len == 0 {
        c.max_input_len = c.max_seq_len - 1;
    }
    if c.max_input_len >= c.max_seq_len {
        return Err(BuildError::InvalidBuildConfig(format!(
            "max_input_len ({}) must be less than max_seq_len ({})",
            c.max_input_len, c.max_seq_len
        )));
    }
    if c.max_batch_size == 0 || c.max_num_tokens == 0 {
        return Err(BuildError::InvalidBuildConfig(
            "max_batch_size and max_num_tokens must be positive".into(),
        ));
    }
    Ok(c)
}

/// Writes the engine; `calibration` holds the float model's activation statistics when the
/// quantization needs them.
pub(crate) fn write_engine(
    ck: &dyn Checkpoint,
    spec: &ModelSpec,
    model: ModelConfig,
    config: &BuildConfig,
    output: &Path,
    calibration: Option<&Calibration>,
    progress: BuildProgress,
) -> Result<EngineConfig> {
    let build = resolve(config, &model, ck.native_dtype())?;
    let dtype = build.dtype.unwrap_or(DType::F32);
    let total = spec.layers.len() + 2;
    // The quantizable modules: the router stays float.
    let mlp_parts = |i: usize| -> Vec<String> {
        let up = model.mlp_in(i).0;
        match model.moe(i) {
            None => vec![up.into(), names::DOWN.into()],
            Some(m) => (0..m.num_experts)
                .flat_map(|e| [up, names::DOWN].map(|p| format!("{}.{e}.{p}", names::EXPERTS)))
                .collect(),
        }
    };
    let modules: Vec<String> = (0..spec.layers.len())
        .flat_map(|i| {
            [names::QKV, names::O]
                .into_iter()
                .map(String::from)
                .chain(mlp_parts(i))
                .map(move |p| format!("layers.{i}.{p}"))
        })
        .chain([LM_HEAD.to_string()])
        .collect();
    let mut out = Out {
        ck,
        w: EngineWriter::create(output)?,
        dtype,
        quantizer: Quantizer::new(&build.quant, &modules, calibration)?,
        keep: build.keep_quantized,
    };
    let h = model.hidden_size;

    progress(0, total, "embeddings");
    // With tied embeddings the table is also the output head, quantized as `lm_head`.
    let embed_module = model.tie_word_embeddings.then_some(LM_HEAD);
    let embed = [spec.embed.as_str()];
    out.matrix(
        &embed,
        names::EMBED_PREFIX,
        embed_module,
        [model.vocab_size, h],
    )?;
    if let Some(pe) = &spec.pos_embed {
        let shape = [model.max_position_embeddings, h];
        out.matrix(&[pe.as_str()], names::POS_EMBED_PREFIX, None, shape)?;
    }
    for (i, layer) in spec.layers.iter().enumerate() {
        progress(i + 1, total, "layers");
        let (up_part, up_rows) = model.mlp_in(i);
        let inter = model.mlp_inter(i);
        let mut linears: Vec<(String, &LinearSpec, usize, usize)> = vec![
            (names::QKV.into(), &layer.qkv, model.qkv_dim(), h),
            (names::O.into(), &layer.o, h, model.q_dim()),
        ];
        match &layer.experts {
            None => {
                linears.push((up_part.into(), &layer.up, up_rows, h));
                linears.push((names::DOWN.into(), &layer.down, h, inter));
            }
            Some((router, experts)) => {
                let shape = [experts.len(), h];
                out.matrix(
                    &[router.as_str()],
                    &format!("layers.{i}.{}", names::ROUTER),
                    None,
                    shape,
                )?;
                for (e, (up, down)) in experts.iter().enumerate() {
                    let part = |p: &str| format!("{}.{e}.{p}", names::EXPERTS);
                    linears.push((part(up_part), up, up_rows, h));
                    linears.push((part(names::DOWN), down, h, inter));
                }
            }
        }
        for (part, lin, rows, cols) in linears {
            out.linear(&format!("layers.{i}.{part}"), lin, rows, cols)?;
        }
        let w = &mut out.w;
        write_norm(
            ck,
            w,
            &layer.attn_norm,
            &format!("layers.{i}.{}", names::ATTN_NORM),
            h,
        )?;
        if let Some((an, mn)) = &layer.post_norms {
            write_norm(
                ck,
                w,
                an,
                &format!("layers.{i}.{}", names::POST_ATTN_NORM),
                h,
            )?;
            write_norm(
                ck,
                w,
                mn,
                &format!("layers.{i}.{}", names::POST_MLP_NORM),
                h,
            )?;
        }
        if let Some((qn, kn)) = &layer.qk_norm {
            let hd = model.head_dim;
            write_norm(ck, w, qn, &format!("layers.{i}.{}", names::Q_NORM), hd)?;
            write_norm(ck, w, kn, &format!("layers.{i}.{}", names::K_NORM), hd)?;
        }
        write_norm(
            ck,
            w,
            &layer.mlp_norm,
            &format!("layers.{i}.{}", names::MLP_NORM),
            h,
        )?;
    }
    progress(total - 1, total, "output head");
    write_norm(ck, &mut out.w, &spec.final_norm, names::FINAL_NORM, h)?;
    if !model.tie_word_embeddings {
        let head = [spec.lm_head.as_str()];
        out.matrix(
            &head,
            names::LM_HEAD_PREFIX,
            Some(LM_HEAD),
            [model.vocab_size, h],
        )?;
    }
    let report = out.quantizer.into_report();
    let engine = out.w.finish(model, build)?;
    progress(total, total, &format!("done: {report}"));
    Ok(engine)
}

/// Where matrices go: float in `dtype`, packed by the quantizer, or packed as the checkpoint
/// stored them (`keep`).
struct Out<'a> {
    ck: &'a dyn Checkpoint,
    w: EngineWriter,
    dtype: DType,
    quantizer: Quantizer<'a>,
    keep: bool,
}

impl Out<'_> {
    /// A plain matrix stacked from checkpoint tensors `srcs`, written as `{prefix}.weight`;
    /// `module` names it to the quantizer (None: never quantized).
    fn matrix(
        &mut self,
        srcs: &[&str],
        prefix: &str,
        module: Option<&str>,
        shape: [usize; 2],
    ) -> Result<()> {
        if self.keep {
            if let Some(p) = self.kept(srcs.iter().map(|s| (*s, None)), shape)? {
                return Ok(self.w.add_packed(prefix, &p)?);
            }
        }
        let t = self.ck.require(srcs[0])?;
        check_shape(self.ck, srcs[0], &t.shape, &shape)?;
        self.weight(prefix, module, t.data, shape)
    }

    fn linear(&mut self, module: &str, lin: &LinearSpec, rows: usize, cols: usize) -> Result<()> {
        let kept = match self.keep && lin.iter().all(|p| !p.transposed) {
            true => self.kept(
                lin.iter().map(|p| (p.weight.as_str(), p.unpermute_heads)),
                [rows, cols],
            )?,
            false => None,
        };
        let (weight, bias) = linear(self.ck, lin, rows, cols, kept.is_none())?;
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
    /// is stored in the same packed format (otherwise None: the float path is lossless too).
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
                Some(s) if s.format == p.format => {
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

fn check_shape(ck: &dyn Checkpoint, name: &str, got: &[usize], expected: &[usize]) -> Result<()> {
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

fn write_norm(
    ck: &dyn Checkpoint,
    w: &mut EngineWriter,
    spec: &NormSpec,
    prefix: &str,
    dim: usize,
) -> Result<()> {
    let weight = ck.require(&spec.weight)?;
    check_shape(ck, &spec.weight, &weight.shape, &[dim])?;
    let values: Vec<f32> = weight.data.iter().map(|&x| x + spec.offset).collect();
    w.add(
        &format!("{prefix}.weight"),
        DType::F32,
        &[dim],
        &DType::F32.encode(&values),
    )?;
    if let Some(b) = ck.tensor(&spec.bias)? {
        check_shape(ck, &spec.bias, &b.shape, &[dim])?;
        w.add(
            &format!("{prefix}.bias"),
            DType::F32,
            &[dim],
            &DType::F32.encode(&b.data),
        )?;
    }
    Ok(())
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
    let mut weight = Vec::with_capacity(rows * cols);
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
