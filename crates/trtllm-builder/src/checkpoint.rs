//! Checkpoint sources: named tensors read as f32 regardless of how they are stored.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::SafeTensors;
use trtllm_runtime::quant::{DType, PackedWeight};

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
    /// Q8_0 / Q4_0 / Q4_1); None for float tensors and checkpoints without quantized storage.
    fn packed(&self, _name: &str) -> Result<Option<PackedWeight>> {
        Ok(None)
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
}

impl SafetensorsCheckpoint {
    /// Opens `model.safetensors`, or every shard `model.safetensors.index.json` lists.
    pub fn open(dir: &Path, dtype: Option<DType>) -> Result<Self> {
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
        })
    }
}

impl Checkpoint for SafetensorsCheckpoint {
    fn path(&self) -> &Path {
        &self.dir
    }

    fn native_dtype(&self) -> Option<DType> {
        self.dtype
    }

    fn tensor(&self, name: &str) -> Result<Option<Tensor>> {
        let Some(&i) = self.index.get(name) else {
            return Ok(None);
        };
        let (path, mmap) = &self.files[i];
        let bad = |m: String| BuildError::checkpoint(path, m);
        let st = SafeTensors::deserialize(mmap).map_err(|e| bad(e.to_string()))?;
        let view = st.tensor(name).map_err(|e| bad(e.to_string()))?;
        let dtype = match view.dtype() {
            safetensors::Dtype::F32 => DType::F32,
            safetensors::Dtype::BF16 => DType::BF16,
            safetensors::Dtype::F16 => DType::F16,
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
