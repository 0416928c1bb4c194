//! GGUF files: the container (metadata and tensor directory), the model config its metadata
//! describes, and its tensors as a [`Checkpoint`].

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use trtllm_runtime::quant::{ggml::GgmlType, DType, PackedWeight};
use trtllm_runtime::{
    Features, LocalRope, MlpKind, ModelConfig, NormKind, PositionKind, RopeScaling,
};

use crate::family::{gemma_sliding_layers, Family, GEMMA3_LOCAL_THETA, SUPPORTED};
use crate::{BuildError, Checkpoint, Result, Tensor};

#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Int(i64),
    UInt(u64),
    Float(f64),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::UInt(v) => Some(v),
            Value::Int(v) if v >= 0 => Some(v as u64),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::Float(v) => Some(v),
            Value::UInt(v) => Some(v as f64),
            Value::Int(v) => Some(v as f64),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct TensorEntry {
    /// Row-major shape (GGUF lists dimensions innermost first; this is reversed).
    pub shape: Vec<usize>,
    pub ty: GgmlType,
    pub offset: usize,
}

pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    pub metadata: HashMap<String, Value>,
    pub tensors: HashMap<String, TensorEntry>,
    data_start: usize,
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| {
                BuildError::checkpoint(
                    self.path,
                    format!("truncated GGUF: needed {n} bytes at offset {}", self.pos),
                )
            })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }

    fn len(&mut self) -> Result<usize> {
        let n = self.u64()?;
        // Every element takes at least one byte, so a count past the file is corrupt, not a
        // reason to allocate.
        if n as usize > self.buf.len() {
            return Err(BuildError::checkpoint(
                self.path,
                format!("corrupt GGUF: length {n} at offset {}", self.pos),
            ));
        }
        Ok(n as usize)
    }

    fn string(&mut self) -> Result<String> {
        let n = self.len()?;
        Ok(String::from_utf8_lossy(self.take(n)?).into_owned())
    }

    fn value(&mut self, ty: u32, depth: usize) -> Result<Value> {
        let b = |r: &mut Self, n| r.take(n).map(|s| s.to_vec());
        Ok(match ty {
            0 => Value::UInt(b(self, 1)?[0] as u64),
            1 => Value::Int(b(self, 1)?[0] as i8 as i64),
            2 => Value::UInt(u16::from_le_bytes(b(self, 2)?.try_into().expect("2")) as u64),
            3 => Value::Int(i16::from_le_bytes(b(self, 2)?.try_into().expect("2")) as i64),
            4 => Value::UInt(self.u32()? as u64),
            5 => Value::Int(self.u32()? as i32 as i64),
            6 => Value::Float(f32::from_bits(self.u32()?) as f64),
            7 => Value::Bool(b(self, 1)?[0] != 0),
            8 => Value::Str(self.string()?),
            9 if depth == 0 => {
                let ety = self.u32()?;
                let n = self.len()?;
                // Each element is held as a 32-byte value: a count no vocabulary comes near is
                // corrupt, not a reason to allocate gigabytes.
                if n > MAX_ARRAY {
                    return Err(BuildError::checkpoint(
                        self.path,
                        format!("corrupt GGUF: an array of {n} entries (at most {MAX_ARRAY})"),
                    ));
                }
                Value::Array(
                    (0..n)
                        .map(|_| self.value(ety, depth + 1))
                        .collect::<Result<_>>()?,
                )
            }
            10 => Value::UInt(self.u64()?),
            11 => Value::Int(self.u64()? as i64),
            12 => Value::Float(f64::from_bits(self.u64()?)),
            other => {
                return Err(BuildError::checkpoint(
                    self.path,
                    format!("corrupt GGUF: unknown value type {other}"),
                ))
            }
        })
    }
}

/// Most entries a metadata array may have (the largest vocabularies hold ~256k tokens).
const MAX_ARRAY: usize = 1 << 22;

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let f = File::open(path).map_err(|e| BuildError::io(path, e))?;
        // SAFETY: the checkpoint is a read-only input for the duration of the build.
        let mmap = unsafe { Mmap::map(&f) }.map_err(|e| BuildError::io(path, e))?;
        let mut r = Reader {
            buf: &mmap,
            pos: 0,
            path,
        };
        let magic = r.take(4)?;
        if magic != b"GGUF" {
            return Err(BuildError::checkpoint(
                path,
                format!("not a GGUF file: bad magic {magic:02x?} (expected \"GGUF\")"),
            ));
        }
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            return Err(BuildError::checkpoint(
                path,
                format!("GGUF version {version} is not supported (2 or 3)"),
            ));
        }
        let n_tensors = r.len()?;
        let n_kv = r.len()?;
        let mut metadata = HashMap::new();
        for _ in 0..n_kv {
            let key = r.string()?;
            let ty = r.u32()?;
            metadata.insert(key, r.value(ty, 0)?);
        }
        let mut tensors = HashMap::new();
        for _ in 0..n_tensors {
            let name = r.string()?;
            let n_dims = r.u32()? as usize;
            if n_dims > 4 {
                return Err(BuildError::checkpoint(
                    path,
                    format!("tensor '{name}' has {n_dims} dimensions"),
                ));
            }
            let mut shape: Vec<usize> = (0..n_dims).map(|_| r.len()).collect::<Result<_>>()?;
            shape.reverse();
            let ty = GgmlType::from_id(r.u32()?)
                .map_err(|e| BuildError::checkpoint(path, format!("tensor '{name}': {e}")))?;
            let offset = r.u64()? as usize;
            if tensors.contains_key(&name) {
                return Err(BuildError::checkpoint(
                    path,
                    format!("corrupt GGUF: tensor '{name}' appears twice"),
                ));
            }
            tensors.insert(name, TensorEntry { shape, ty, offset });
        }
        let align = metadata
            .get("general.alignment")
            .and_then(Value::as_u64)
            .unwrap_or(32)
            .max(1) as usize;
        let data_start = r.pos.next_multiple_of(align);
        let file = Self {
            path: path.to_path_buf(),
            mmap,
            metadata,
            tensors,
            data_start,
        };
        for (name, t) in &file.tensors {
            if !t.offset.is_multiple_of(align) {
                return Err(BuildError::checkpoint(
                    path,
                    format!(
                        "corrupt GGUF: tensor '{name}' at offset {} is not aligned to {align} bytes",
                        t.offset
                    ),
                ));
            }
            file.tensor_bytes(name, t)?;
        }
        Ok(file)
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    fn tensor_bytes(&self, name: &str, t: &TensorEntry) -> Result<&[u8]> {
        let elems = t.shape.iter().product::<usize>();
        let len =
            t.ty.byte_len(elems)
                .map_err(|e| BuildError::checkpoint(&self.path, format!("tensor '{name}': {e}")))?;
        let start = self.data_start.checked_add(t.offset);
        let end = start
            .and_then(|s| s.checked_add(len))
            .filter(|&e| e <= self.mmap.len());
        match (start, end) {
            (Some(s), Some(e)) => Ok(&self.mmap[s..e]),
            _ => Err(BuildError::checkpoint(
                &self.path,
                format!("tensor '{name}' extends past the end of the file (truncated?)"),
            )),
        }
    }

    /// EOS and, where the file names them or the vocabulary has Gemma's `<end_of_turn>`, the
    /// end-of-turn tokens: generation stops at any (llama.cpp's end-of-generation set).
    fn end_tokens(&self) -> Vec<u32> {
        let id = |k: &str| {
            self.get(&format!("tokenizer.ggml.{k}"))
                .and_then(Value::as_u64)
                .map(|v| v as u32)
        };
        let mut ids: Vec<u32> = ["eos_token_id", "eot_token_id", "eom_token_id"]
            .iter()
            .filter_map(|k| id(k))
            .collect();
        let tokens = self.get("tokenizer.ggml.tokens").and_then(Value::as_array);
        if let Some(i) =
            tokens.and_then(|t| t.iter().position(|v| v.as_str() == Some("<end_of_turn>")))
        {
            ids.push(i as u32);
        }
        ids.dedup();
        ids
    }

    /// The family and decoder config the metadata describes.
    pub fn model_config(&self) -> Result<(Family, ModelConfig)> {
        let arch = self
            .get("general.architecture")
            .and_then(Value::as_str)
            .ok_or_else(|| BuildError::MissingField {
                path: self.path.clone(),
                field: "general.architecture".into(),
                arch: "GGUF".into(),
            })?;
        let family = match arch {
            "llama" => Family::Llama,
            "mistral" => Family::Mistral,
            "qwen2" => Family::Qwen2,
            "gemma3" => Family::Gemma3,
            "gpt2" => Family::Gpt2,
            other => {
                return Err(BuildError::UnsupportedArchitecture {
                    path: self.path.clone(),
                    arch: other.into(),
                    supported: SUPPORTED,
                })
            }
        };
        let key = |k: &str| format!("{arch}.{k}");
        let req = |k: &str| -> Result<usize> {
            self.get(&key(k))
                .and_then(Value::as_u64)
                .map(|v| v as usize)
                .ok_or_else(|| BuildError::MissingField {
                    path: self.path.clone(),
                    field: key(k),
                    arch: format!("GGUF architecture {arch}"),
                })
        };
        let float = |k: &str, d: f64| self.get(&key(k)).and_then(Value::as_f64).unwrap_or(d) as f32;
        let hidden = req("embedding_length")?;
        let heads = req("attention.head_count")?;
        let vocab = match self.get(&key("vocab_size")).and_then(Value::as_u64) {
            Some(v) => v as usize,
            None => self
                .get("tokenizer.ggml.tokens")
                .and_then(Value::as_array)
                .map_or(0, |t| t.len()),
        };
        let gpt2 = family == Family::Gpt2;
        let gemma = family == Family::Gemma3;
        let head_dim = self
            .get(&key("attention.key_length"))
            .and_then(Value::as_u64)
            .map_or(hidden / heads.max(1), |v| v as usize);
        let token = |k: &str| {
            self.get(&format!("tokenizer.ggml.{k}"))
                .and_then(Value::as_u64)
                .map(|v| v as u32)
        };
        let model = ModelConfig {
            architecture: format!("gguf:{arch}"),
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: req("feed_forward_length")?,
            num_layers: req("block_count")?,
            num_heads: heads,
            num_kv_heads: self
                .get(&key("attention.head_count_kv"))
                .and_then(Value::as_u64)
                .map_or(heads, |v| v as usize),
            head_dim,
            max_position_embeddings: req("context_length")?,
            norm: if gpt2 {
                NormKind::LayerNorm
            } else {
                NormKind::RmsNorm
            },
            norm_eps: if gpt2 {
                float("attention.layer_norm_epsilon", 1e-5)
            } else {
                float("attention.layer_norm_rms_epsilon", 1e-6)
            },
            mlp: match family {
                Family::Gpt2 => MlpKind::GeluTanh,
                Family::Gemma3 => MlpKind::GatedGeluTanh,
                _ => MlpKind::GatedSilu,
            },
            position: if gpt2 {
                PositionKind::Learned
            } else {
                PositionKind::Rope {
                    theta: float("rope.freq_base", 10000.0),
                    rotary_dim: self
                        .get(&key("rope.dimension_count"))
                        .and_then(Value::as_u64)
                        .map_or(head_dim, |v| v as usize),
                    scaling: match self.get(&key("rope.scaling.type")).and_then(Value::as_str) {
                        Some("linear") => RopeScaling::Linear {
                            factor: float("rope.scaling.factor", 1.0),
                        },
                        _ => RopeScaling::None,
                    },
                }
            },
            tie_word_embeddings: !self.tensors.contains_key("output.weight"),
            features: Features {
                // llama.cpp's key for Mistral-style windows (every layer; Gemma 3's 5 of 6).
                sliding_window: self
                    .get(&key("attention.sliding_window"))
                    .and_then(Value::as_u64)
                    .map(|w| w as usize),
                ..Features::default()
            },
            bos_token_id: token("bos_token_id"),
            eos_token_ids: self.end_tokens(),
            stage_layers: None,
        };
        let check = |m: &ModelConfig| {
            m.validate()
                .map_err(|e| BuildError::checkpoint(&self.path, e.to_string()))
        };
        // Before Gemma's per-layer tables are sized by the layer count, and after.
        check(&model)?;
        let model = match gemma {
            true => gemma3_features(model),
            false => model,
        };
        check(&model)?;
        Ok((family, model))
    }
}

/// What a Gemma 3 GGUF leaves implied, as llama.cpp and transformers fill it in: every sixth
/// layer global and the others windowed with their own RoPE base (10 000), (1 + w) norms (folded
/// into the file's weights by llama.cpp's converter), q/k norms, pre- and post-norms,
/// embeddings scaled by √hidden, and the attention scale of head_dim (hidden / heads for the
/// 27B model, whose original config says so).
fn gemma3_features(mut m: ModelConfig) -> ModelConfig {
    let f = &mut m.features;
    f.qk_norm = true;
    f.post_norms = true;
    f.embed_scale = Some((m.hidden_size as f32).sqrt());
    f.sliding_layers = gemma_sliding_layers(m.num_layers, Family::Gemma3.gemma_pattern());
    f.local_rope = Some(LocalRope {
        theta: GEMMA3_LOCAL_THETA,
        scaling: RopeScaling::None,
    });
    let scalar = match m.num_layers {
        62 => m.hidden_size / m.num_heads,
        _ => m.head_dim,
    };
    f.query_pre_attn_scalar = Some(scalar as f32);
    m
}

impl Checkpoint for GgufFile {
    fn path(&self) -> &Path {
        &self.path
    }

    fn native_dtype(&self) -> Option<DType> {
        None
    }

    fn packed(&self, name: &str) -> Result<Option<PackedWeight>> {
        let Some(t) = self.tensors.get(name) else {
            return Ok(None);
        };
        let [rows, cols] = t.shape[..] else {
            return Ok(None);
        };
        let bytes = self.tensor_bytes(name, t)?;
        t.ty.to_packed(bytes, rows, cols)
            .map_err(|e| BuildError::checkpoint(&self.path, format!("tensor '{name}': {e}")))
    }

    fn tensor(&self, name: &str) -> Result<Option<Tensor>> {
        let Some(t) = self.tensors.get(name) else {
            return Ok(None);
        };
        let bytes = self.tensor_bytes(name, t)?;
        let elems = t.shape.iter().product();
        let data =
            t.ty.dequantize(bytes, elems)
                .map_err(|e| BuildError::checkpoint(&self.path, format!("tensor '{name}': {e}")))?;
        Ok(Some(Tensor {
            shape: t.shape.clone(),
            data,
        }))
    }
}
