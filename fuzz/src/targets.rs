//! The loaders under test, each a [`Target`]: GGUF files and Hugging Face checkpoints (their
//! safetensors and config.json) through the builder into a running engine, engine directories
//! through the runtime, tokenizer files through the API's tokenizer.

use std::path::{Path, PathBuf};

use trtllm_api::builder::{build, BuildConfig};
use trtllm_api::runtime::{LogitsMode, Session};
use trtllm_api::{ChatMessage, ChatOptions, Tokenizer};

use crate::formats::FileKind;
use crate::harness::{Input, Outcome, Seed, SeedFile, Target};

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn fixture(name: &str) -> PathBuf {
    repo().join("tests/fixtures").join(name)
}

fn read(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// A seed whose `files` are mutated and whose other files come from `dir`.
fn seed(
    name: &str,
    dir: Option<PathBuf>,
    files: &[(&str, PathBuf, FileKind)],
) -> anyhow::Result<Seed> {
    Ok(Seed {
        name: name.into(),
        dir,
        files: files
            .iter()
            .map(|(rel, path, kind)| {
                Ok(SeedFile {
                    rel: rel.to_string(),
                    bytes: read(path)?,
                    kind: *kind,
                })
            })
            .collect::<anyhow::Result<_>>()?,
    })
}

/// An error must say something; a panic or abort never reaches here.
pub(crate) fn refused(e: impl std::fmt::Display) -> Result<Outcome, String> {
    let message = e.to_string();
    if message.trim().is_empty() {
        return Err("an error with an empty message".into());
    }
    Ok(Outcome::Refused(message))
}

/// Opens an engine and runs a prompt and a decode step through it.
fn run_engine(dir: &Path) -> Result<Outcome, String> {
    let session = match Session::open(dir) {
        Ok(s) => s,
        Err(e) => return refused(e),
    };
    let runner = match session.model_runner() {
        Ok(r) => r,
        Err(e) => return refused(e),
    };
    let step = || -> trtllm_api::runtime::Result<()> {
        let mut cache = runner.new_cache(8)?;
        runner.forward(&[1, 2, 3], &mut cache, LogitsMode::All)?;
        runner.forward(&[4], &mut cache, LogitsMode::Last)?;
        Ok(())
    };
    match step() {
        Ok(()) => Ok(Outcome::Accepted),
        Err(e) => refused(e),
    }
}

fn build_and_run(checkpoint: &Path, out: &Path, config: &BuildConfig) -> Result<Outcome, String> {
    match build(checkpoint, out, config, &mut |_, _, _| {}) {
        Ok(_) => run_engine(out),
        Err(e) => refused(e),
    }
}

const CONFIG_WORDS: &[&str] = &[
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "max_position_embeddings",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "rope_type",
    "factor",
    "rms_norm_eps",
    "tie_word_embeddings",
    "sliding_window",
    "layer_types",
    "bos_token_id",
    "eos_token_id",
    "torch_dtype",
    "architectures",
    "model_type",
    "quantization_config",
    "bits",
    "group_size",
    "num_local_experts",
    "num_experts_per_tok",
    "attn_logit_softcapping",
    "final_logit_softcapping",
    "partial_rotary_factor",
    "format_version",
    "max_seq_len",
    "max_batch_size",
    "kv_cache_dtype",
    "ranks",
    "mapping",
    "world_size",
    "tp_size",
    "pp_size",
];

/// GGUF files through `trtllm build` (quantized weights converted, or kept when the flag is
/// set) and into a running engine.
pub struct Gguf {
    seeds: Vec<Seed>,
}

impl Gguf {
    pub fn new() -> anyhow::Result<Self> {
        let seeds = vec![
            seed(
                "tiny-llama.gguf",
                None,
                &[(
                    "model.gguf",
                    repo().join("fuzz/seeds/tiny-llama.gguf"),
                    FileKind::Gguf,
                )],
            )?,
            seed(
                "spm-llama.gguf",
                None,
                &[(
                    "model.gguf",
                    fixture("gguf-tokenizers/spm-llama.gguf"),
                    FileKind::Gguf,
                )],
            )?,
        ];
        Ok(Self { seeds })
    }
}

impl Target for Gguf {
    fn name(&self) -> &'static str {
        "gguf"
    }
    fn seeds(&self) -> &[Seed] {
        &self.seeds
    }
    fn run(&self, dir: &Path, input: &Input) -> Result<Outcome, String> {
        let config = BuildConfig {
            keep_quantized: input.flag,
            ..Default::default()
        };
        build_and_run(&dir.join("model.gguf"), &dir.join("engine"), &config)
    }
}

/// Hugging Face checkpoint directories with one file mutated: `model.safetensors` (the
/// `Safetensors` target) or `config.json` (the `HfConfig` target).
pub struct Checkpoint {
    name: &'static str,
    seeds: Vec<Seed>,
}

const SAFETENSORS_WORDS: &[&str] = &[
    "dtype",
    "shape",
    "data_offsets",
    "F32",
    "F16",
    "BF16",
    "I32",
    "I64",
    "I8",
    "U8",
    "F8_E4M3",
    "BOOL",
    "__metadata__",
];

impl Checkpoint {
    pub fn safetensors() -> anyhow::Result<Self> {
        let kind = FileKind::LenPrefixedJson {
            len_at: 0,
            json_at: 8,
            align: 1,
            fields: &[],
            dictionary: SAFETENSORS_WORDS,
        };
        Self::new(
            "safetensors",
            "model.safetensors",
            kind,
            &[
                "tiny-llama",
                "tiny-llama-gptq-int4",
                "tiny-llama-fp8-channel",
                "tiny-qwen3-moe",
            ],
        )
    }

    pub fn hf_config() -> anyhow::Result<Self> {
        let kind = FileKind::Json {
            dictionary: CONFIG_WORDS,
        };
        Self::new(
            "hf-config",
            "config.json",
            kind,
            &[
                "tiny-llama",
                "tiny-qwen3-moe",
                "tiny-gemma3",
                "tiny-phi3-longrope",
                "tiny-llama-gptq-int4",
                "tiny-mistral-swa",
                "tiny-gpt2",
            ],
        )
    }

    fn new(
        name: &'static str,
        file: &str,
        kind: FileKind,
        fixtures: &[&str],
    ) -> anyhow::Result<Self> {
        let seeds = fixtures
            .iter()
            .map(|f| seed(f, Some(fixture(f)), &[(file, fixture(f).join(file), kind)]))
            .collect::<anyhow::Result<_>>()?;
        Ok(Self { name, seeds })
    }
}

impl Target for Checkpoint {
    fn name(&self) -> &'static str {
        self.name
    }
    fn seeds(&self) -> &[Seed] {
        &self.seeds
    }
    fn run(&self, dir: &Path, _: &Input) -> Result<Outcome, String> {
        let out = dir.join("engine");
        build_and_run(dir, &out, &BuildConfig::default())
    }
}

/// Engine directories (config.json, or the rank file with its checksum fixed up unless the
/// flag keeps it stale) through the runtime.
pub struct Engine {
    seeds: Vec<Seed>,
    _built: tempfile::TempDir,
}

impl Engine {
    pub fn new() -> anyhow::Result<Self> {
        let built = tempfile::tempdir()?;
        let mut seeds = Vec::new();
        let sources = [
            ("float", fixture("tiny-llama"), false),
            ("kept-gguf", repo().join("fuzz/seeds/tiny-llama.gguf"), true),
        ];
        for (name, checkpoint, keep_quantized) in sources {
            let out = built.path().join(name);
            let config = BuildConfig {
                keep_quantized,
                ..Default::default()
            };
            build(&checkpoint, &out, &config, &mut |_, _, _| {})?;
            let rank = FileKind::LenPrefixedJson {
                len_at: 16,
                json_at: 24,
                align: 64,
                fields: &[(8, 4), (12, 4)],
                dictionary: &[
                    "name", "dtype", "shape", "offset", "bytes", "format", "float32", "uint8",
                    "int8",
                ],
            };
            let config = FileKind::Json {
                dictionary: CONFIG_WORDS,
            };
            seeds.push(seed(
                name,
                Some(out.clone()),
                &[
                    ("config.json", out.join("config.json"), config),
                    ("rank0.engine", out.join("rank0.engine"), rank),
                ],
            )?);
        }
        Ok(Self {
            seeds,
            _built: built,
        })
    }
}

/// Makes config.json's size and checksum of the rank file match the file (when config.json
/// still parses), so mutations reach the tensor index and the weights.
fn fix_checksum(dir: &Path) {
    let Ok(rank) = std::fs::read(dir.join("rank0.engine")) else {
        return;
    };
    let path = dir.join("config.json");
    let Ok(mut cfg) = std::fs::read(&path).map(|b| serde_json::from_slice::<serde_json::Value>(&b))
    else {
        return;
    };
    if let Ok(cfg) = cfg.as_mut() {
        if let Some(r) = cfg.pointer_mut("/ranks/0").and_then(|r| r.as_object_mut()) {
            r.insert("bytes".into(), rank.len().into());
            r.insert("crc32".into(), crc32fast::hash(&rank).into());
            if let Ok(text) = serde_json::to_vec(cfg) {
                let _ = std::fs::write(&path, text);
            }
        }
    }
}

impl Target for Engine {
    fn name(&self) -> &'static str {
        "engine"
    }
    fn seeds(&self) -> &[Seed] {
        &self.seeds
    }
    fn run(&self, dir: &Path, input: &Input) -> Result<Outcome, String> {
        if !input.flag {
            fix_checksum(dir);
        }
        run_engine(dir)
    }
}

const TOKENIZER_WORDS: &[&str] = &[
    "type",
    "BPE",
    "WordPiece",
    "Unigram",
    "WordLevel",
    "ByteLevel",
    "Metaspace",
    "Split",
    "Sequence",
    "Replace",
    "NFC",
    "Prepend",
    "pattern",
    "Regex",
    "String",
    "behavior",
    "Isolated",
    "merges",
    "vocab",
    "added_tokens",
    "special",
    "content",
    "id",
    "normalizer",
    "pre_tokenizer",
    "decoder",
    "post_processor",
    "byte_fallback",
    "unk_token",
    "TemplateProcessing",
    "chat_template",
    "bos_token",
    "eos_token",
    "add_bos_token",
];

const TEXTS: &[&str] = &[
    "Hello, world!",
    "<|im_start|>user\nhi<|im_end|>",
    " \u{fffd}é東🎉\n\t  x",
    "",
];

/// `tokenizer.json` and `tokenizer_config.json` (special tokens, chat template) through the
/// API's tokenizer: load, encode, decode, token bytes and a chat rendering.
pub struct Tokenizers {
    seeds: Vec<Seed>,
}

impl Tokenizers {
    pub fn new() -> anyhow::Result<Self> {
        let kind = FileKind::Json {
            dictionary: TOKENIZER_WORDS,
        };
        let seeds = ["tiny-llama", "tiny-gemma3", "tiny-phi3", "tiny-gpt2"]
            .iter()
            .map(|f| {
                let d = fixture(f);
                seed(
                    f,
                    None,
                    &[
                        ("tokenizer.json", d.join("tokenizer.json"), kind),
                        (
                            "tokenizer_config.json",
                            d.join("tokenizer_config.json"),
                            kind,
                        ),
                    ],
                )
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Self { seeds })
    }
}

impl Target for Tokenizers {
    fn name(&self) -> &'static str {
        "tokenizer"
    }
    fn seeds(&self) -> &[Seed] {
        &self.seeds
    }
    fn run(&self, dir: &Path, _: &Input) -> Result<Outcome, String> {
        let tok = match Tokenizer::from_dir(dir) {
            Ok(t) => t,
            Err(e) => return refused(e),
        };
        let work = || -> trtllm_api::Result<()> {
            let vocab = tok.vocab_size() as u32;
            for text in TEXTS {
                let ids = tok.encode(text, true)?;
                tok.decode(&ids, false)?;
                tok.encode_as_text(text)?;
            }
            let ids: Vec<u32> = (0..vocab.min(64))
                .chain([vocab.saturating_sub(1), vocab, u32::MAX])
                .collect();
            let _ = tok.decode(&ids, true);
            for &id in &ids {
                let _ = tok.token_piece(id);
            }
            let messages = [
                ChatMessage::new("system", "Be brief."),
                ChatMessage::new("user", TEXTS[2]),
            ];
            tok.encode_chat(&messages, &ChatOptions::default())?;
            Ok(())
        };
        match work() {
            Ok(()) => Ok(Outcome::Accepted),
            Err(e) => refused(e),
        }
    }
}
