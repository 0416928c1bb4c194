//! `build()`: checkpoint → engine directory.

use std::path::Path;

use trtllm_runtime::engine::{names, EngineConfig, EngineWriter};
use trtllm_runtime::quant::{Calibration, DType, QuantAlgo, Quantizer, LM_HEAD};
use trtllm_runtime::{BuildConfig, LoraAdapter, ModelConfig, PositionKind};

use crate::calibrate::{calibrate, CalibrationInput};
use crate::checkpoint::SafetensorsCheckpoint;
use crate::family::{self, LinearSpec, ModelSpec, NormSpec};
use crate::gguf::GgufFile;
use crate::matrices::{check_shape, Out};
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
/// The engine is written to a scratch directory beside `output` and moved into place whole at
/// the end (replacing what `output` held): a build that fails or is killed never leaves a
/// half-written engine where one is expected.
pub fn build(
    checkpoint: &Path,
    output: &Path,
    config: &BuildConfig,
    progress: BuildProgress,
) -> Result<EngineConfig> {
    let name = output
        .file_name()
        .map_or("engine".into(), |n| n.to_string_lossy().into_owned());
    let scratch = output.with_file_name(format!(".{name}.building-{}", std::process::id()));
    remove_stale_scratch(output, &name);
    let built = build_into(checkpoint, &scratch, config, progress).and_then(|engine| {
        let engine = match config.mapping.is_parallel() {
            true => {
                progress(0, 1, "splitting the engine over its ranks");
                crate::shard::shard_engine(&scratch, engine, config.mapping)?
            }
            false => engine,
        };
        if output.exists() {
            std::fs::remove_dir_all(output).map_err(|e| BuildError::io(output, e))?;
        }
        std::fs::rename(&scratch, output).map_err(|e| BuildError::io(output, e))?;
        Ok(engine)
    });
    if built.is_err() {
        // Cleaning up is best effort: the build's own error is the one to report.
        let _ = std::fs::remove_dir_all(&scratch);
    }
    built
}

/// Removes the scratch directories of earlier builds of `output` whose process is gone (killed
/// mid-build), and this process's own. Only where `/proc` says which processes live.
fn remove_stale_scratch(output: &Path, name: &str) {
    if !Path::new("/proc/self").exists() {
        return;
    }
    let parent = match output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let prefix = format!(".{name}.building-");
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for e in entries.flatten() {
        let file = e.file_name();
        let pid = file
            .to_str()
            .and_then(|f| f.strip_prefix(&prefix)?.parse::<u32>().ok());
        let stale = pid
            .is_some_and(|p| p == std::process::id() || !Path::new(&format!("/proc/{p}")).exists());
        if stale {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

fn build_into(
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
        check_split(config, &model)?;
        let ck = SafetensorsCheckpoint::open(checkpoint, hf.dtype, hf.prequant)?;
        let spec = family::hf_spec(hf.family, &model);
        let tok_path = checkpoint.join("tokenizer.json");
        // A broken tokenizer fails the build, not the first run.
        if tok_path.exists() {
            crate::tokenizer_json::read(&tok_path).map_err(|e| BuildError::Checkpoint {
                path: tok_path.clone(),
                message: format!("not a tokenizer: {e}"),
            })?;
        }
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
        check_split(config, &model)?;
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

/// A split (`--tp-size`, `--pp-size`) the model cannot take fails before any weight is read.
fn check_split(config: &BuildConfig, model: &ModelConfig) -> Result<()> {
    let shards = (0..config.mapping.world_size)
        .map(|rank| config.mapping.shard(model, rank))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    // Weights kept as the checkpoint stores them are checked as they are cut.
    match config.keep_quantized {
        true => Ok(()),
        false => crate::shard::check_quantized_cuts(&config.quant, model, &shards),
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
    let mut build = resolve(config, &model, ck.native_dtype())?;
    let dtype = build.dtype.unwrap_or(DType::F32);
    let total = spec.layers.len() + 2;
    // A checkpoint published quantized keeps its weights as stored unless the build quantizes.
    if let Some(how) = ck.prequantized() {
        if build.quant.quant_algo() == QuantAlgo::NoQuant {
            build.keep_quantized = true;
            progress(
                0,
                total,
                &format!("{how} weights kept as stored (no requantization)"),
            );
        }
    }
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
    let merge = match &build.merge_lora {
        Some(_) if build.keep_quantized => {
            return Err(BuildError::InvalidBuildConfig(
                "merging a LoRA adapter needs float weights: not with --quant keep or a \
                 checkpoint published quantized"
                    .into(),
            ))
        }
        Some(dir) => Some(LoraAdapter::load("merged", dir, &model, usize::MAX)?),
        None => None,
    };
    let mut out = Out {
        ck,
        w: EngineWriter::create(output)?,
        dtype,
        quantizer: Quantizer::new(&build.quant, &modules, calibration)?,
        keep: build.keep_quantized,
        merge: merge.as_ref(),
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
