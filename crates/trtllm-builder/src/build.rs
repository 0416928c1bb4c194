//! `build()`: checkpoint → engine directory.

use std::path::Path;

use trtllm_runtime::engine::{names, EngineConfig, EngineWriter};
use trtllm_runtime::quant::DType;
use trtllm_runtime::{BuildConfig, ModelConfig, PositionKind};

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
    if checkpoint.is_dir() {
        let hf = hf_config::read(checkpoint)?;
        let mut model = hf.model;
        model.eos_token_ids = merge_generation_eos(checkpoint, model.eos_token_ids);
        let ck = SafetensorsCheckpoint::open(checkpoint, hf.dtype)?;
        let spec = family::hf_spec(hf.family, &model);
        let engine = write_engine(&ck, &spec, model, config, output, progress)?;
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
        let engine = write_engine(&gguf, &spec, model, config, output, progress)?;
        let (tokenizer, tok_config) = gguf_tokenizer::convert(&gguf)?;
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

/// Fills in the limits left at 0 and rejects impossible ones.
fn resolve(
    config: &BuildConfig,
    model: &ModelConfig,
    native: Option<DType>,
) -> Result<BuildConfig> {
    let mut c = config.clone();
    c.dtype = Some(c.dtype.or(native).unwrap_or(DType::F32));
    if c.max_seq_len == 0 {
        c.max_seq_len = model.max_position_embeddings;
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

fn write_engine(
    ck: &dyn Checkpoint,
    spec: &ModelSpec,
    model: ModelConfig,
    config: &BuildConfig,
    output: &Path,
    progress: BuildProgress,
) -> Result<EngineConfig> {
    let build = resolve(config, &model, ck.native_dtype())?;
    let dtype = build.dtype.unwrap_or(DType::F32);
    let total = spec.layers.len() + 2;
    let mut w = EngineWriter::create(output)?;
    let h = model.hidden_size;

    progress(0, total, "embeddings");
    write_matrix(
        ck,
        &mut w,
        &spec.embed,
        names::EMBED,
        [model.vocab_size, h],
        dtype,
    )?;
    if let Some(pe) = &spec.pos_embed {
        write_matrix(
            ck,
            &mut w,
            pe,
            names::POS_EMBED,
            [model.max_position_embeddings, h],
            dtype,
        )?;
    }
    let inter = model.intermediate_size;
    let (up_part, up_rows) = model.mlp_in();
    for (i, layer) in spec.layers.iter().enumerate() {
        progress(i + 1, total, "layers");
        let linears: [(&str, &LinearSpec, usize, usize); 4] = [
            (names::QKV, &layer.qkv, model.qkv_dim(), h),
            (names::O, &layer.o, h, model.q_dim()),
            (up_part, &layer.up, up_rows, h),
            (names::DOWN, &layer.down, h, inter),
        ];
        for (part, lin, rows, cols) in linears {
            let (weight, bias) = linear(ck, lin, rows, cols)?;
            w.add(
                &names::layer(i, part, "weight"),
                dtype,
                &[rows, cols],
                &dtype.encode(&weight),
            )?;
            if let Some(b) = bias {
                w.add(
                    &names::layer(i, part, "bias"),
                    DType::F32,
                    &[rows],
                    &DType::F32.encode(&b),
                )?;
            }
        }
        write_norm(
            ck,
            &mut w,
            &layer.attn_norm,
            &format!("layers.{i}.{}", names::ATTN_NORM),
            h,
        )?;
        write_norm(
            ck,
            &mut w,
            &layer.mlp_norm,
            &format!("layers.{i}.{}", names::MLP_NORM),
            h,
        )?;
    }
    progress(total - 1, total, "output head");
    write_norm(ck, &mut w, &spec.final_norm, names::FINAL_NORM, h)?;
    if !model.tie_word_embeddings {
        write_matrix(
            ck,
            &mut w,
            &spec.lm_head,
            names::LM_HEAD,
            [model.vocab_size, h],
            dtype,
        )?;
    }
    let engine = w.finish(model, build)?;
    progress(total, total, "done");
    Ok(engine)
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

/// Copies checkpoint matrix `src` (`shape`) into the engine as `dst`, stored as `dtype`.
fn write_matrix(
    ck: &dyn Checkpoint,
    w: &mut EngineWriter,
    src: &str,
    dst: &str,
    shape: [usize; 2],
    dtype: DType,
) -> Result<()> {
    let t = ck.require(src)?;
    check_shape(ck, src, &t.shape, &shape)?;
    w.add(dst, dtype, &shape, &dtype.encode(&t.data))?;
    Ok(())
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
    w.add(
        &format!("{prefix}.weight"),
        DType::F32,
        &[dim],
        &DType::F32.encode(&weight.data),
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
fn linear(
    ck: &dyn Checkpoint,
    parts: &LinearSpec,
    rows: usize,
    cols: usize,
) -> Result<(Vec<f32>, Option<Vec<f32>>)> {
    let mut weight = Vec::with_capacity(rows * cols);
    let mut bias: Vec<f32> = Vec::new();
    let mut any_bias = false;
    for p in parts {
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
    if weight.len() != rows * cols {
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
fn unpermute_rows(data: &[f32], heads: usize, cols: usize) -> Vec<f32> {
    let rows = data.len() / cols;
    let head_dim = rows / heads;
    let half = head_dim / 2;
    let mut out = vec![0f32; data.len()];
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
