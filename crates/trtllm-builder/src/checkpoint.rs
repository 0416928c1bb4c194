//! Checkpoint sources: named tensors read as f32 regardless of how they are stored.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::SafeTensors;
use trtllm_runtime::quant::{DType, PackedWeight};

use crate::prequant::{PreQuant, Words};
use crate::{BuildError, Result};

/// A tensor widened to f32, row-major.
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// Where the builder reads weights from.
pub trait Checkpoint {
    /// The file or directory, for error messages.
    fn path(&self) -> &Path;
    /// The tensor called `name`, or None when the checkpoint has no such tensor.
    fn tensor(&self, name: &str) -> Result<Option<Tensor>>;
    /// The storage type most weights are in, when it is one an engine can keep losslessly.
    fn native_dtype(&self) -> Option<DType>;

    /// The tensor in a native packed format when the checkpoint stores it quantized (GGUF
    /// blocks, GPTQ/AWQ/FP8 safetensors); None for float tensors and checkpoints without
    /// quantized storage.
    fn packed(&self, _name: &str) -> Result<Option<PackedWeight>> {
        Ok(None)
    }

    /// How a checkpoint published quantized stores its weights (a Hugging Face
    /// `quantization_config`); such weights are kept as stored unless the build asks otherwise.
    fn prequantized(&self) -> Option<String> {
        None
    }

    fn require(&self, name: &str) -> Result<Tensor> {
        self.tensor(name)?.ok_or_else(|| BuildError::MissingTensor {
            path: self.path().to_path_buf(),
            name: name.to_string(),
        })
    }
}

/// The `*.safetensors` files of a Hugging Face directory, memory-mapped.
pub struct SafetensorsCheckpoint {
    dir: PathBuf,
    files: Vec<(PathBuf, Mmap)>,
    /// Tensor name → index into `files`.
    index: HashMap<String, usize>,
    dtype: Option<DType>,
    prequant: Option<PreQuant>,
}

/// A tensor's bytes as stored.
pub(crate) struct Raw<'a> {
    pub dtype: safetensors::Dtype,
    pub shape: Vec<usize>,
    pub data: &'a [u8],
}

impl SafetensorsCheckpoint {
    /// Opens `model.safetensors`, or every shard `model.safetensors.index.json` lists.
    pub fn open(dir: &Path, dtype: Option<DType>, prequant: Option<PreQuant>) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index_path = dir.join("model.safetensors.index.json");
        let shard_names: Vec<String> = if index_path.exists() {
            let text =
                std::fs::read_to_string(&index_path).map_err(|e| BuildError::io(&index_path, e))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| BuildError::checkpoint(&index_path, e.to_string()))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| BuildError::MissingField {
                    path: index_path.clone(),
                    field: "weight_map".into(),
                    arch: "a sharded checkpoint".into(),
                })?;
            let mut names: Vec<String> = map
                .values()
                .filter_map(|f| f.as_str().map(String::from))
                .collect();
            names.sort();
            names.dedup();
            names
        } else if single.exists() {
            vec!["model.safetensors".into()]
        } else {
            return Err(BuildError::checkpoint(
                dir,
                "no model.safetensors or model.safetensors.index.json",
            ));
        };
        let mut files = Vec::new();
        let mut index = HashMap::new();
        for (i, name) in shard_names.iter().enumerate() {
            let path = dir.join(name);
            let f = File::open(&path).map_err(|e| BuildError::io(&path, e))?;
            // SAFETY: checkpoint files are read-only inputs for the duration of the build.
            let mmap = unsafe { Mmap::map(&f) }.map_err(|e| BuildError::io(&path, e))?;
            let st = SafeTensors::deserialize(&mmap).map_err(|e| {
                BuildError::checkpoint(&path, format!("not a valid safetensors file: {e}"))
            })?;
            for n in st.names() {
                index.insert(n.to_string(), i);
            }
            files.push((path, mmap));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            files,
            index,
            dtype,
            prequant,
        })
    }

    /// The tensor called `name` as stored, or None when there is none.
    pub(crate) fn raw(&self, name: &str) -> Result<Option<Raw<'_>>> {
        let Some(&i) = self.index.get(name) else {
            return Ok(None);
        };
        let (path, mmap) = &self.files[i];
        let bad = |m: String| BuildError::checkpoint(path, m);
        let st = SafeTensors::deserialize(mmap).map_err(|e| bad(e.to_string()))?;
        let view = st.tensor(name).map_err(|e| bad(e.to_string()))?;
        Ok(Some(Raw {
            dtype: view.dtype(),
            shape: view.shape().to_vec(),
            data: view.data(),
        }))
    }

    /// An int32 tensor (packed codes, `g_idx`) as little-endian words.
    pub(crate) fn words(&self, name: &str) -> Result<Option<Words>> {
        let Some(raw) = self.raw(name)? else {
            return Ok(None);
        };
        if raw.dtype != safetensors::Dtype::I32 {
            return Err(BuildError::checkpoint(
                &self.dir,
                format!("tensor '{name}' is {:?}, expected I32", raw.dtype),
            ));
        }
        let data = raw
            .data
            .chunks_exact(4)
            .map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]))
            .collect();
        Ok(Some(Words {
            shape: raw.shape,
            data,
        }))
    }

    pub(crate) fn require_words(&self, name: &str) -> Result<Words> {
        self.words(name)?.ok_or_else(|| BuildError::MissingTensor {
            path: self.dir.clone(),
            name: name.to_string(),
        })
    }

    /// A quantized weight widened to f32 (for float builds and requantization).
    fn dequantized(&self, name: &str) -> Result<Option<Tensor>> {
        let Some(p) = self.packed(name)? else {
            return Ok(None);
        };
        Ok(Some(Tensor {
            shape: vec![p.rows, p.cols],
            data: p.dequantize()?,
        }))
    }
}

impl Checkpoint for SafetensorsCheckpoint {
    fn path(&self) -> &Path {
        &self.dir
    }

    fn native_dtype(&self) -> Option<DType> {
        self.dtype
    }

    fn packed(&self, name: &str) -> Result<Option<PackedWeight>> {
        match (&self.prequant, name.strip_suffix(".weight")) {
            (Some(q), Some(prefix)) => q.packed(self, prefix),
            _ => Ok(None),
        }
    }

    fn prequantized(&self) -> Option<String> {
        self.prequant.map(|q| q.describe())
    }

    fn tensor(&self, name: &str) -> Result<Option<Tensor>> {
        let Some(&i) = self.index.get(name) else {
            // A GPTQ/AWQ weight is stored under other names.
            return self.dequantized(name);
        };
        let (path, mmap) = &self.files[i];
        let bad = |m: String| BuildError::checkpoint(path, m);
        let st = SafeTensors::deserialize(mmap).map_err(|e| bad(e.to_string()))?;
        let view = st.tensor(name).map_err(|e| bad(e.to_string()))?;
        let dtype = match view.dtype() {
            safetensors::Dtype::F32 => DType::F32,
            safetensors::Dtype::BF16 => DType::BF16,
            safetensors::Dtype::F16 => DType::F16,
            safetensors::Dtype::F8_E4M3 if self.prequant.is_some() => {
                return self.dequantized(name)
            }
            other => {
                return Err(bad(format!(
                    "tensor '{name}' has unsupported dtype {other:?}"
                )))
            }
        };
        let data = dtype.decode(view.data(), name)?;
        Ok(Some(Tensor {
            shape: view.shape().to_vec(),
            data,
        }))
    }
}
