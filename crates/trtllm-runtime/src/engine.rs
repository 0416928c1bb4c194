//! The engine directory format.
//!
//! ```text
//! DIR/config.json   { format_version, model: ModelConfig, build: BuildConfig,
//!                     ranks: [{ file, bytes, crc32 }] }
//! DIR/rank0.engine  "TRTLLMRS" | u32 version | u32 0 | u64 index_len | index JSON | pad |
//!                   tensor data, each tensor at a 64-byte aligned offset from the data start
//! ```
//! The index lists `{ name, dtype, shape, offset, bytes, format? }`. Weights are already in the
//! layout the kernels read (QKV and gate/up fused, `[out × in]` rows), so the runtime maps the
//! file and reads in place. A quantized weight `P.weight` is stored as uint8 codes
//! `[rows × code bytes]` tagged with its `format`, beside `P.weight_scale` (f32 per group),
//! `P.weight_offset` (zero points), `P.weight_block_scale` / `P.weight_global_scale` (NVFP4),
//! and optionally `P.pre_quant_scale` (per input channel, multiplied into the activations),
//! `P.input_perm` (the input column each weight column reads, as f32: GPTQ act-order) and
//! `P.input_scale` (static FP8 activation scale). Opening an engine checks the version, the file
//! size and its CRC-32.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use serde::{Deserialize, Serialize};
use trtllm_quant::{DType, LayerQuantConfig, PackedWeight, WeightFormat};

use crate::{ModelConfig, Result, RuntimeError};

/// Bumped whenever the layout of config.json or rank files changes incompatibly.
/// Version 2 added packed quantized tensors; version 3 the family features (q/k norms,
/// post-norms, windows, soft caps, experts), which an older reader would silently ignore.
/// Version 4 added RoPE scalings whose frequencies follow the sequence (dynamic, YaRN,
/// LongRoPE), a local RoPE for sliding-window layers and experts of their own size in some
/// layers. Version 5 added the `mapping` (an engine split over ranks, each file a shard), which
/// an older reader would take for a whole model. Versions 1 to 4 read unchanged (every feature
/// off, one rank).
pub const ENGINE_FORMAT_VERSION: u32 = 5;
const READABLE_VERSIONS: std::ops::RangeInclusive<u32> = 1..=ENGINE_FORMAT_VERSION;
const MAGIC: &[u8; 8] = b"TRTLLMRS";
const ALIGN: usize = 64;

/// The limits and choices an engine was built with.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BuildConfig {
    pub max_batch_size: usize,
    /// Longest prompt accepted.
    pub max_input_len: usize,
    /// Longest prompt + generated sequence; 0 means the model's max_position_embeddings.
    pub max_seq_len: usize,
    /// Most tokens processed in one forward pass.
    pub max_num_tokens: usize,
    /// Storage type of the unquantized weights; None keeps the checkpoint's own (lossless).
    pub dtype: Option<DType>,
    /// Weight and KV-cache quantization.
    pub quant: LayerQuantConfig,
    /// Keep the checkpoint's own quantized weights (GGUF Q8_0 / Q4_0 / Q4_1) as they are.
    pub keep_quantized: bool,
    /// Float storage of the KV cache when it is not quantized: float32 (`None`, and engines
    /// written before this field), bfloat16 or float16 (half the KV memory and attention reads).
    pub kv_cache_dtype: Option<DType>,
    /// Widest beam search a request may ask for (TensorRT-LLM's `max_beam_width`).
    pub max_beam_width: usize,
    /// Highest LoRA rank an adapter may have (TensorRT-LLM's `max_lora_rank`).
    pub max_lora_rank: usize,
    /// LoRA adapters resident on the runner's device at once (vLLM's `max_loras`): the most
    /// distinct adapters one step batches.
    pub max_loras: usize,
    /// LoRA adapters kept read and checked on the host (vLLM's `max_cpu_loras`).
    pub max_cpu_loras: usize,
    /// A PEFT LoRA adapter merged into the weights at build time (`W += B·A·scaling`, before
    /// any quantization): the engine is that fine-tune, at no run-time cost.
    pub merge_lora: Option<std::path::PathBuf>,
    /// The ranks to split the engine over (`--tp-size`, `--pp-size`); recorded as config.json's
    /// top-level `mapping`, with the files it made.
    #[serde(skip)]
    pub mapping: crate::parallel::Mapping,
}

impl Default for BuildConfig {
    fn default() -> Self {
        Self {
            max_batch_size: 8,
            max_input_len: 0,
            max_seq_len: 0,
            max_num_tokens: 8192,
            dtype: None,
            quant: LayerQuantConfig::default(),
            keep_quantized: false,
            kv_cache_dtype: None,
            max_beam_width: 4,
            max_lora_rank: 64,
            max_loras: 4,
            max_cpu_loras: 8,
            merge_lora: None,
            mapping: crate::parallel::Mapping::default(),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RankFile {
    pub file: String,
    pub bytes: u64,
    pub crc32: u32,
}

/// The contents of an engine's config.json.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EngineConfig {
    pub format_version: u32,
    pub model: ModelConfig,
    /// Resolved: `max_seq_len` and `max_input_len` are never 0 here.
    pub build: BuildConfig,
    /// How the model is split over ranks (`ranks` lists one file per rank, in rank order).
    #[serde(default)]
    pub mapping: crate::parallel::Mapping,
    pub ranks: Vec<RankFile>,
}

impl EngineConfig {
    /// Checks a prompt against the engine's limits and vocabulary.
    pub fn validate_prompt(&self, prompt: &[u32]) -> Result<()> {
        let build = &self.build;
        if prompt.is_empty() {
            return Err(RuntimeError::EmptyPrompt);
        }
        if prompt.len() > build.max_input_len {
            return Err(RuntimeError::PromptTooLong {
                len: prompt.len(),
                max: build.max_input_len,
                limit: "max_input_len",
            });
        }
        if prompt.len() >= build.max_seq_len {
            return Err(RuntimeError::PromptTooLong {
                len: prompt.len(),
                max: build.max_seq_len - 1,
                limit: "max_seq_len - 1",
            });
        }
        self.check_ids(prompt)
    }

    /// Every id must be inside the vocabulary.
    pub fn check_ids(&self, ids: &[u32]) -> Result<()> {
        let vocab = self.model.vocab_size;
        match ids.iter().find(|&&id| id as usize >= vocab) {
            Some(&id) => Err(RuntimeError::TokenOutOfRange { id, vocab }),
            None => Ok(()),
        }
    }

    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| RuntimeError::io(&path, e))?;
        let raw: serde_json::Value =
            serde_json::from_str(&text).map_err(|source| RuntimeError::Json {
                path: path.clone(),
                source,
            })?;
        let version = raw
            .get("format_version")
            .and_then(|v| v.as_u64())
            .ok_or_else(|| {
                RuntimeError::corrupt(
                    &path,
                    "missing field format_version: not a trtllm engine directory",
                )
            })?;
        if !READABLE_VERSIONS.contains(&(version as u32)) {
            return Err(RuntimeError::FormatVersion {
                path,
                found: version as u32,
                supported: ENGINE_FORMAT_VERSION,
            });
        }
        let cfg: EngineConfig =
            serde_json::from_value(raw).map_err(|source| RuntimeError::Json {
                path: path.clone(),
                source,
            })?;
        cfg.model.validate()?;
        cfg.mapping.validate()?;
        if cfg.ranks.len() != cfg.mapping.world_size {
            return Err(RuntimeError::corrupt(
                &path,
                format!(
                    "{} rank files listed for a world of {} ranks",
                    cfg.ranks.len(),
                    cfg.mapping.world_size
                ),
            ));
        }
        Ok(cfg)
    }

    /// Writes `DIR/config.json`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let path = dir.join("config.json");
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| RuntimeError::corrupt(&path, e.to_string()))?;
        std::fs::write(&path, text).map_err(|e| RuntimeError::io(&path, e))
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub offset: usize,
    pub bytes: usize,
    /// Set on the codes of a quantized weight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<WeightFormat>,
}

/// Streams tensors into a rank file (and, for a whole model, writes config.json when finished).
pub struct EngineWriter {
    dir: PathBuf,
    file: String,
    index: Vec<TensorInfo>,
    data: BufWriter<File>,
    data_path: PathBuf,
    written: usize,
}

impl EngineWriter {
    /// A writer of a whole model's `rank0.engine`.
    pub fn create(dir: &Path) -> Result<Self> {
        Self::create_file(dir, &crate::parallel::Mapping::rank_file(0))
    }

    /// A writer of the rank file `file` in `dir`.
    pub fn create_file(dir: &Path, file: &str) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| RuntimeError::io(dir, e))?;
        // Tensor data goes to a scratch file first: the index, which precedes it, is only
        // known once every tensor is written.
        let data_path = dir.join(format!("{file}.data.tmp"));
        let f = File::create(&data_path).map_err(|e| RuntimeError::io(&data_path, e))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            file: file.into(),
            index: Vec::new(),
            data: BufWriter::new(f),
            data_path,
            written: 0,
        })
    }

    pub fn add(&mut self, name: &str, dtype: DType, shape: &[usize], bytes: &[u8]) -> Result<()> {
        self.add_formatted(name, (dtype, None), shape, bytes)
    }

    /// [`Self::add`] of a tensor tagged with its packed `format` (quantized codes), if any.
    pub fn add_formatted(
        &mut self,
        name: &str,
        (dtype, format): (DType, Option<WeightFormat>),
        shape: &[usize],
        bytes: &[u8],
    ) -> Result<()> {
        let expected = shape.iter().product::<usize>() * dtype.size_bytes();
        if bytes.len() != expected {
            return Err(RuntimeError::TensorShape {
                name: name.into(),
                expected: vec![expected],
                got: vec![bytes.len()],
            });
        }
        let pad = self.written.next_multiple_of(ALIGN) - self.written;
        let io = |e| RuntimeError::io(&self.data_path, e);
        self.data.write_all(&[0u8; ALIGN][..pad]).map_err(io)?;
        self.written += pad;
        self.data.write_all(bytes).map_err(io)?;
        self.index.push(TensorInfo {
            name: name.into(),
            dtype,
            shape: shape.to_vec(),
            offset: self.written,
            bytes: bytes.len(),
            format,
        });
        self.written += bytes.len();
        Ok(())
    }

    /// Writes a quantized weight as `{prefix}.weight` (codes, tagged with the format) and its
    /// scale tensors.
    pub fn add_packed(&mut self, prefix: &str, p: &PackedWeight) -> Result<()> {
        let weight = format!("{prefix}.weight");
        let code_bytes = p.format.code_bytes(p.cols);
        let codes = (DType::U8, Some(p.format));
        self.add_formatted(&weight, codes, &[p.rows, code_bytes], &p.codes)?;
        let spr = p.format.scales_per_row(p.cols);
        if spr > 0 {
            let scale = DType::F32.encode(&p.scales);
            self.add(
                &format!("{prefix}.weight_scale"),
                DType::F32,
                &[p.rows, spr],
                &scale,
            )?;
        }
        if let Some(o) = &p.offsets {
            let off = DType::F32.encode(o);
            self.add(
                &format!("{prefix}.weight_offset"),
                DType::F32,
                &[p.rows, spr],
                &off,
            )?;
        }
        if p.format == WeightFormat::Nvfp4 {
            let shape = [p.rows, p.cols / 16];
            self.add(
                &format!("{prefix}.weight_block_scale"),
                DType::U8,
                &shape,
                &p.block_scales,
            )?;
            let g = DType::F32.encode(&[p.global_scale]);
            self.add(
                &format!("{prefix}.weight_global_scale"),
                DType::F32,
                &[1],
                &g,
            )?;
        }
        if let Some(perm) = &p.input_perm {
            // Column indices as f32: exact below 2^24 columns.
            let v: Vec<f32> = perm.iter().map(|&c| c as f32).collect();
            let name = format!("{prefix}.input_perm");
            self.add(&name, DType::F32, &[p.cols], &DType::F32.encode(&v))?;
        }
        Ok(())
    }

    /// Assembles rank0.engine and writes config.json; returns the engine's config.
    pub fn finish(self, model: ModelConfig, build: BuildConfig) -> Result<EngineConfig> {
        let dir = self.dir.clone();
        let cfg = EngineConfig {
            format_version: ENGINE_FORMAT_VERSION,
            model,
            build,
            mapping: crate::parallel::Mapping::default(),
            ranks: vec![self.finish_rank()?],
        };
        cfg.write(&dir)?;
        Ok(cfg)
    }

    /// Assembles the rank file from the index and the data written.
    pub fn finish_rank(mut self) -> Result<RankFile> {
        self.data
            .flush()
            .map_err(|e| RuntimeError::io(&self.data_path, e))?;
        drop(self.data);
        let index = serde_json::to_vec(&self.index)
            .map_err(|e| RuntimeError::corrupt(&self.dir, e.to_string()))?;
        let mut header = Vec::new();
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&ENGINE_FORMAT_VERSION.to_le_bytes());
        header.extend_from_slice(&0u32.to_le_bytes());
        header.extend_from_slice(&(index.len() as u64).to_le_bytes());
        header.extend_from_slice(&index);
        header.resize(header.len().next_multiple_of(ALIGN), 0);

        let path = self.dir.join(&self.file);
        let io = |e| RuntimeError::io(&path, e);
        let mut out = BufWriter::new(File::create(&path).map_err(io)?);
        let mut crc = crc32fast::Hasher::new();
        out.write_all(&header).map_err(io)?;
        crc.update(&header);
        let mut data =
            File::open(&self.data_path).map_err(|e| RuntimeError::io(&self.data_path, e))?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = std::io::Read::read(&mut data, &mut buf)
                .map_err(|e| RuntimeError::io(&self.data_path, e))?;
            if n == 0 {
                break;
            }
            crc.update(&buf[..n]);
            out.write_all(&buf[..n]).map_err(io)?;
        }
        out.flush().map_err(io)?;
        std::fs::remove_file(&self.data_path).map_err(|e| RuntimeError::io(&self.data_path, e))?;

        Ok(RankFile {
            file: self.file,
            bytes: (header.len() + self.written) as u64,
            crc32: crc.finalize(),
        })
    }
}

/// A memory-mapped rank file and its tensor index.
pub struct EngineFile {
    mmap: Mmap,
    data_start: usize,
    tensors: BTreeMap<String, TensorInfo>,
}

impl EngineFile {
    pub fn open(dir: &Path, rank: &RankFile) -> Result<Arc<Self>> {
        let path = dir.join(&rank.file);
        let file = File::open(&path).map_err(|e| RuntimeError::io(&path, e))?;
        // SAFETY: the engine file is treated as read-only input; a concurrent writer would
        // break the checksum below rather than memory safety of the slices we hand out,
        // which are bounds-checked against the mapped length.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| RuntimeError::io(&path, e))?;
        if mmap.len() as u64 != rank.bytes {
            return Err(RuntimeError::corrupt(
                &path,
                format!(
                    "file is {} bytes, config.json says {} (truncated or replaced?)",
                    mmap.len(),
                    rank.bytes
                ),
            ));
        }
        if crc32fast::hash(&mmap) != rank.crc32 {
            return Err(RuntimeError::corrupt(
                &path,
                "checksum mismatch: the engine file is corrupt",
            ));
        }
        if mmap.len() < 24 || &mmap[..8] != MAGIC {
            return Err(RuntimeError::corrupt(
                &path,
                "not a trtllm engine file (bad magic)",
            ));
        }
        let version = u32::from_le_bytes(mmap[8..12].try_into().expect("4 bytes"));
        if !READABLE_VERSIONS.contains(&version) {
            return Err(RuntimeError::FormatVersion {
                path,
                found: version,
                supported: ENGINE_FORMAT_VERSION,
            });
        }
        let index_len = u64::from_le_bytes(mmap[16..24].try_into().expect("8 bytes")) as usize;
        let index_end = 24usize.checked_add(index_len).filter(|&e| e <= mmap.len());
        let index_end = index_end
            .ok_or_else(|| RuntimeError::corrupt(&path, "tensor index runs past the end"))?;
        let index: Vec<TensorInfo> =
            serde_json::from_slice(&mmap[24..index_end]).map_err(|source| RuntimeError::Json {
                path: path.clone(),
                source,
            })?;
        let data_start = index_end.next_multiple_of(ALIGN);
        for t in &index {
            let expected = t.shape.iter().product::<usize>() * t.dtype.size_bytes();
            let end = data_start
                .checked_add(t.offset)
                .and_then(|s| s.checked_add(t.bytes));
            if t.bytes != expected || end.is_none_or(|e| e > mmap.len()) {
                return Err(RuntimeError::corrupt(
                    &path,
                    format!("tensor '{}' has an inconsistent extent", t.name),
                ));
            }
        }
        let tensors = index.into_iter().map(|t| (t.name.clone(), t)).collect();
        Ok(Arc::new(Self {
            mmap,
            data_start,
            tensors,
        }))
    }

    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name)
    }

    pub fn tensors(&self) -> impl Iterator<Item = &TensorInfo> {
        self.tensors.values()
    }

    /// The bytes of a tensor described by `info` (which came from this file's index).
    pub fn bytes(&self, info: &TensorInfo) -> &[u8] {
        let start = self.data_start + info.offset;
        &self.mmap[start..start + info.bytes]
    }

    pub fn len(&self) -> usize {
        self.mmap.len()
    }

    pub fn is_empty(&self) -> bool {
        self.mmap.is_empty()
    }
}

/// Tensor names inside an engine, shared by the builder (writer) and the decoder (reader).
pub mod names {
    /// Matrices are `{prefix}.weight` (plus scale tensors when quantized).
    pub const EMBED_PREFIX: &str = "embed";
    pub const POS_EMBED_PREFIX: &str = "pos_embed";
    pub const LM_HEAD_PREFIX: &str = "lm_head";
    pub const EMBED: &str = "embed.weight";
    pub const POS_EMBED: &str = "pos_embed.weight";
    pub const FINAL_NORM: &str = "final_norm";
    pub const LM_HEAD: &str = "lm_head.weight";

    /// Parts of one decoder layer; weights are `{part}.weight`, biases `{part}.bias`.
    pub const ATTN_NORM: &str = "attn_norm";
    pub const QKV: &str = "qkv";
    pub const O: &str = "o";
    pub const MLP_NORM: &str = "mlp_norm";
    /// Per-head RMSNorms of the queries and keys (Qwen3, Gemma 3): `[head_dim]` each.
    pub const Q_NORM: &str = "q_norm";
    pub const K_NORM: &str = "k_norm";
    /// Norms of the attention and MLP outputs before the residual add (Gemma 2/3).
    pub const POST_ATTN_NORM: &str = "post_attn_norm";
    pub const POST_MLP_NORM: &str = "post_mlp_norm";
    /// A mixture of experts: the router `[num_experts × hidden]` (float, never quantized) and
    /// each expert's `experts.{e}.gate_up` / `experts.{e}.down`.
    pub const ROUTER: &str = "router";
    pub const EXPERTS: &str = "experts";
    /// Fused `[gate ; up]` for gated MLPs, plain `up` otherwise.
    pub const GATE_UP: &str = "gate_up";
    pub const UP: &str = "up";
    pub const DOWN: &str = "down";

    pub fn layer(i: usize, part: &str, kind: &str) -> String {
        format!("layers.{i}.{part}.{kind}")
    }
}
