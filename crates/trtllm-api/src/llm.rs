//! `LLM`: the entry point — opens (or builds) an engine, starts the executor, and turns prompts
//! into `RequestOutput`s.

use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

use std::sync::{Arc, OnceLock};
use trtllm_executor::builder::{self, BuildConfig};

use trtllm_executor::runtime::Device;
use trtllm_executor::{
    ExecutorConfig, GenerationExecutor, GenerationRequest, LogitsProcessor, SpeculativeConfig,
};

use crate::chat::{ChatMessage, ChatOptions};
use crate::completion::{CompletionSpec, CompletionState};
use crate::guided::Guides;
use crate::processors::{BadWords, Chain};
use crate::{ApiError, RequestOutput, RequestStream, Result, SamplingParams, Tokenizer};

#[derive(Clone, Debug, Default)]
pub struct LlmArgs {
    /// An engine directory, a Hugging Face checkpoint directory or a `.gguf` file. Checkpoints are
    /// built on first use into `engine_cache_dir`, keyed by checkpoint and build config.
    pub model: PathBuf,
    /// Where the tokenizer files are; defaults to the engine directory.
    pub tokenizer: Option<PathBuf>,
    /// A chat template (its source) used instead of the checkpoint's.
    pub chat_template: Option<String>,
    /// Work on token ids only.
    pub skip_tokenizer_init: bool,
    pub build_config: BuildConfig,
    /// Defaults to `$TRTLLM_CACHE` or `~/.cache/trtllm`, under `engines/`.
    pub engine_cache_dir: Option<PathBuf>,
    /// Scheduler policy, batch limits and KV-cache pool.
    pub executor_config: ExecutorConfig,
    /// Where the model and its KV cache live (`Device::Cuda` needs the `cuda` feature and a GPU).
    pub device: Device,
}

impl LlmArgs {
    /// The engine `model` names: itself, or its checkpoint built into the cache (now, unless
    /// built before), with a note of what this call built. `LLM::new` starts with this; a
    /// launcher calls it alone to build a split engine once, before starting its ranks.
    pub fn resolve_engine(&self) -> Result<(PathBuf, Option<String>)> {
        resolve_engine(
            &self.model,
            &self.build_config,
            self.engine_cache_dir.as_deref(),
        )
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Prompt {
    Text(String),
    TokenIds(Vec<u32>),
}

impl From<&str> for Prompt {
    fn from(s: &str) -> Self {
        Prompt::Text(s.to_string())
    }
}

/// Mean negative log-likelihood of a token sequence.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Perplexity {
    /// Tokens scored (the first token has no context and is not).
    pub tokens: usize,
    pub mean_nll: f64,
    pub perplexity: f64,
}

pub struct LLM {
    executor: GenerationExecutor,
    tokenizer: Option<Arc<Tokenizer>>,
    engine_dir: PathBuf,
    built: Option<String>,
    /// Grammar matchers for structured output, made on first use (the token trie takes a
    /// moment to build).
    guides: OnceLock<std::result::Result<Guides, String>>,
}

impl LLM {
    pub fn new(args: LlmArgs) -> Result<Self> {
        let cache = args.engine_cache_dir.as_deref();
        let (engine_dir, mut built) = args.resolve_engine()?;
        let mut executor_config = args.executor_config.clone();
        // A draft model given as a checkpoint or GGUF is built (or found) like the target, with
        // the default build config.
        if let Some(SpeculativeConfig::DraftTarget {
            speculative_model, ..
        }) = &mut executor_config.speculative
        {
            let (dir, note) = resolve_engine(speculative_model, &BuildConfig::default(), cache)?;
            *speculative_model = dir;
            built = match (built, note) {
                (Some(a), Some(b)) => Some(format!("{a}; {b}")),
                (a, b) => a.or(b),
            };
        }
        let draft_dir = match &executor_config.speculative {
            Some(SpeculativeConfig::DraftTarget {
                speculative_model, ..
            }) => Some(speculative_model.clone()),
            _ => None,
        };
        let executor = GenerationExecutor::on_device(&engine_dir, executor_config, args.device)?;
        let tokenizer = if args.skip_tokenizer_init {
            None
        } else {
            let mut tok = Tokenizer::from_dir(args.tokenizer.as_deref().unwrap_or(&engine_dir))?;
            if let Some(t) = &args.chat_template {
                tok.set_chat_template(t.clone())?;
            }
            Some(Arc::new(tok))
        };
        if let (Some(tok), Some(dir)) = (&tokenizer, &draft_dir) {
            same_vocabulary(tok, dir)?;
        }
        Ok(Self {
            executor,
            tokenizer,
            engine_dir,
            built,
            guides: OnceLock::new(),
        })
    }

    pub fn engine_dir(&self) -> &Path {
        &self.engine_dir
    }

    /// What this `LLM` built from a checkpoint and where, when it built one (`None` when it
    /// opened an engine, or found the cached one).
    pub fn built(&self) -> Option<&str> {
        self.built.as_deref()
    }

    pub fn executor(&self) -> &GenerationExecutor {
        &self.executor
    }

    pub fn tokenizer(&self) -> Result<&Tokenizer> {
        self.tokenizer.as_deref().ok_or_else(|| {
            ApiError::InvalidInput("the tokenizer was not loaded (skip_tokenizer_init)".into())
        })
    }

    /// Token ids of a prompt: text goes through the tokenizer with its special tokens.
    pub fn encode_prompt(&self, prompt: &Prompt) -> Result<Vec<u32>> {
        match prompt {
            Prompt::Text(t) => self.tokenizer()?.encode(t, true),
            Prompt::TokenIds(ids) => Ok(ids.clone()),
        }
    }

    /// Token ids of a conversation rendered through the chat template (which writes its own
    /// special tokens, so the tokenizer adds none; special-token strings inside content are
    /// text unless `opts` says otherwise). Tools the template would not show the model are an
    /// error, not dropped.
    pub fn chat_prompt(&self, messages: &[ChatMessage], opts: &ChatOptions) -> Result<Vec<u32>> {
        let tok = self.tokenizer()?;
        if !opts.tools.is_empty() {
            let text = tok.apply_chat_template(messages, opts)?;
            let bare = ChatOptions {
                tools: Vec::new(),
                ..opts.clone()
            };
            if tok.apply_chat_template(messages, &bare)? == text {
                return Err(ApiError::InvalidInput(
                    "the chat template does not show tools to the model; give one that does \
                     (--chat-template, e.g. docs/chat_templates/chatml-tools.jinja)"
                        .into(),
                ));
            }
        }
        tok.encode_chat(messages, opts)
    }

    /// Generates for every prompt; one output per prompt, in order, each with
    /// `params.n` completions. All prompts are submitted at once and batched by the executor;
    /// a progress bar counts finished prompts when stderr is a terminal.
    pub fn generate(
        &self,
        prompts: &[Prompt],
        params: &SamplingParams,
    ) -> Result<Vec<RequestOutput>> {
        params.validate()?;
        let streams = prompts
            .iter()
            .map(|p| self.submit(text_of(p), self.encode_prompt(p)?, params))
            .collect::<Result<Vec<_>>>()?;
        let progress = if prompts.len() > 1 {
            indicatif::ProgressBar::new(prompts.len() as u64)
        } else {
            indicatif::ProgressBar::hidden()
        };
        let outputs = streams
            .into_iter()
            .map(|s| {
                let out = s.collect();
                progress.inc(1);
                out
            })
            .collect();
        progress.finish_and_clear();
        outputs
    }

    /// Submits one prompt and returns at once; iterate the stream for text deltas.
    pub fn generate_async(&self, prompt: Prompt, params: &SamplingParams) -> Result<RequestStream> {
        params.validate()?;
        let ids = self.encode_prompt(&prompt)?;
        self.submit(text_of(&prompt), ids, params)
    }

    /// One conversation through the chat template.
    pub fn chat(&self, messages: &[ChatMessage], params: &SamplingParams) -> Result<RequestOutput> {
        self.chat_with(messages, &ChatOptions::default(), params)
    }

    /// `chat` rendered with options: tools, template variables, another template.
    pub fn chat_with(
        &self,
        messages: &[ChatMessage],
        opts: &ChatOptions,
        params: &SamplingParams,
    ) -> Result<RequestOutput> {
        self.chat_async_with(messages, opts, params)?.collect()
    }

    /// `chat`, streamed.
    pub fn chat_async(
        &self,
        messages: &[ChatMessage],
        params: &SamplingParams,
    ) -> Result<RequestStream> {
        self.chat_async_with(messages, &ChatOptions::default(), params)
    }

    /// `chat_with`, streamed.
    pub fn chat_async_with(
        &self,
        messages: &[ChatMessage],
        opts: &ChatOptions,
        params: &SamplingParams,
    ) -> Result<RequestStream> {
        params.validate()?;
        let ids = self.chat_prompt(messages, opts)?;
        self.submit(None, ids, params)
    }

    /// Perplexity of a token sequence under the model.
    pub fn perplexity(&self, ids: &[u32]) -> Result<Perplexity> {
        let nll = self.executor.score(ids.to_vec())?;
        let mean = nll.iter().sum::<f64>() / nll.len() as f64;
        Ok(Perplexity {
            tokens: nll.len(),
            mean_nll: mean,
            perplexity: mean.exp(),
        })
    }

    /// Submits the `n` completions of one prompt. They share the prompt's KV blocks through the
    /// prefix cache; if one cannot be submitted, those already submitted are cancelled (their
    /// handles are dropped).
    fn submit(
        &self,
        prompt: Option<String>,
        ids: Vec<u32>,
        params: &SamplingParams,
    ) -> Result<RequestStream> {
        // Every completion's processors before any is submitted: a bad grammar submits nothing.
        let processors = (0..params.requests())
            .map(|_| self.processor(params))
            .collect::<Result<Vec<_>>>()?;
        let results = processors
            .into_iter()
            .enumerate()
            .map(|(i, guide)| {
                let request = GenerationRequest {
                    prompt_token_ids: ids.clone(),
                    params: params.to_generation(i),
                    client_id: None,
                    lora: params.lora_request.clone(),
                };
                self.executor.submit_with(request, guide)
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let eos = &self.executor.engine_config().model.eos_token_ids;
        let eos_ids = if params.ignore_eos { &[][..] } else { eos };
        let states = (0..params.n)
            .map(|index| {
                CompletionState::new(CompletionSpec {
                    index,
                    stop: &params.stop,
                    stop_token_ids: &params.stop_token_ids,
                    eos_ids,
                    want_logprobs: params.logprobs.is_some(),
                    skip_special_tokens: params.skip_special_tokens,
                })
            })
            .collect();
        Ok(RequestStream {
            tokenizer: self.tokenizer.clone(),
            held: (0..params.n).map(|_| None).collect(),
            results,
            states,
            prompt,
            prompt_token_ids: ids,
            prompt_logprobs: None,
            context_logits: None,
            failed: false,
            queued: Default::default(),
        })
    }
}

impl LLM {
    /// What changes one completion's logits before sampling: its grammar, its bad words.
    fn processor(&self, params: &SamplingParams) -> Result<Option<Box<dyn LogitsProcessor>>> {
        let mut all: Vec<Box<dyn LogitsProcessor>> = Vec::new();
        if let Some(g) = &params.guided_decoding {
            all.push(Box::new(self.guides()?.guide(g)?));
        }
        if !params.bad_words.is_empty() {
            all.push(Box::new(BadWords::new(
                self.tokenizer()?,
                &params.bad_words,
            )?));
        }
        Ok(match all.len() {
            0 => None,
            1 => all.pop(),
            _ => Some(Box::new(Chain(all))),
        })
    }

    fn guides(&self) -> Result<&Guides> {
        let made = self.guides.get_or_init(|| {
            let tok = self.tokenizer().map_err(|e| e.to_string())?;
            let model = &self.executor.engine_config().model;
            Guides::new(tok, model.vocab_size, &model.eos_token_ids).map_err(|e| e.to_string())
        });
        made.as_ref().map_err(|e| ApiError::InvalidInput(e.clone()))
    }
}

/// A draft model proposes token ids: the same ids must mean the same text to it. The executor
/// checked the vocabulary sizes; here every token's bytes are compared, when the draft engine has
/// a tokenizer to compare.
fn same_vocabulary(target: &Tokenizer, draft_dir: &Path) -> Result<()> {
    let Ok(draft) = Tokenizer::from_dir(draft_dir) else {
        return Ok(());
    };
    let n = target.vocab_size().max(draft.vocab_size());
    let (a, b) = (target.token_bytes(n, 0xff)?, draft.token_bytes(n, 0xff)?);
    match a.iter().zip(&b).position(|(x, y)| x != y) {
        None => Ok(()),
        Some(id) => Err(ApiError::InvalidInput(format!(
            "draft model {}: token {id} is {:?} to it and {:?} to the target; a draft model \
             must share the target's tokenizer",
            draft_dir.display(),
            String::from_utf8_lossy(&b[id]),
            String::from_utf8_lossy(&a[id]),
        ))),
    }
}

fn text_of(prompt: &Prompt) -> Option<String> {
    match prompt {
        Prompt::Text(t) => Some(t.clone()),
        Prompt::TokenIds(_) => None,
    }
}

/// The engine directory for `model`, building it into the cache (`cache`, else [`cache_dir`])
/// first if it is a checkpoint; and, when this call built it, what it built (for the caller to
/// say once).
fn resolve_engine(
    model: &Path,
    build_config: &BuildConfig,
    cache: Option<&Path>,
) -> Result<(PathBuf, Option<String>)> {
    if model.join("config.json").exists() && model.join("rank0.engine").exists() {
        return Ok((model.to_path_buf(), None));
    }
    let mut config = build_config.clone();
    let gguf = model
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
    let split_only = BuildConfig {
        mapping: Default::default(),
        ..config.clone()
    };
    if gguf && split_only == BuildConfig::default() {
        // A GGUF's own quantization is what its user chose; the float build is 3-5x its size.
        config.keep_quantized = true;
    }
    let cache_root = cache
        .map_or_else(cache_dir, Path::to_path_buf)
        .join("engines");
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| builder::BuildError::Io { path, source }
    };
    std::fs::create_dir_all(&cache_root).map_err(io(&cache_root))?;
    let key = cache_key(model, &config)?;
    let dir = cache_root.join(&key);
    let done = |d: &Path| d.join("config.json").exists() && d.join("rank0.engine").exists();
    if done(&dir) {
        return Ok((dir, None));
    }
    // One builder per engine across processes: the others wait here, then find it done.
    let lock_path = cache_root.join(format!("{key}.lock"));
    let lock = std::fs::File::create(&lock_path).map_err(io(&lock_path))?;
    lock.lock().map_err(io(&lock_path))?;
    if done(&dir) {
        return Ok((dir, None));
    }
    // Build beside the final place and rename, so an interrupted build never looks finished.
    let tmp = cache_root.join(format!("{key}.partial"));
    let _ = std::fs::remove_dir_all(&tmp);
    let built = builder::build(model, &tmp, &config, &mut |_, _, _| {})?;
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&tmp, &dir).map_err(io(&dir))?;
    let weights = match (config.keep_quantized, built.build.dtype) {
        (true, _) => "the file's quantized weights kept as they are".to_string(),
        (false, Some(d)) => format!("{d} weights"),
        (false, None) => "float32 weights".to_string(),
    };
    let note = format!(
        "built an engine for {} ({weights}) into {}",
        model.display(),
        dir.display()
    );
    Ok((dir, Some(note)))
}

/// The root of trtllm's caches (`engines/`, `models/`): `$TRTLLM_CACHE`, else `~/.cache/trtllm`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("TRTLLM_CACHE") {
        return PathBuf::from(d);
    }
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
        .join(".cache")
        .join("trtllm")
}

/// Identifies a checkpoint (path, size and modification time of its files) and a build config,
/// the same in every build of trtllm of this version: a SHA-256 of them, as 32 hex digits.
fn cache_key(model: &Path, config: &BuildConfig) -> Result<String> {
    let meta_err = |e| builder::BuildError::Io {
        path: model.to_path_buf(),
        source: e,
    };
    let canonical = model.canonicalize().map_err(meta_err)?;
    let mut h = Sha256::new();
    let mut field = |bytes: &[u8]| {
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    };
    field(canonical.as_os_str().as_encoded_bytes());
    let files: Vec<PathBuf> = if canonical.is_dir() {
        let mut v: Vec<PathBuf> = std::fs::read_dir(&canonical)
            .map_err(meta_err)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        v.sort();
        v
    } else {
        vec![canonical.clone()]
    };
    for f in files {
        if let Ok(m) = f.metadata() {
            field(f.as_os_str().as_encoded_bytes());
            field(&m.len().to_le_bytes());
            let mtime = m
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos());
            field(&mtime.to_le_bytes());
        }
    }
    let json =
        |v: serde_json::Result<Vec<u8>>| v.map_err(|e| ApiError::InvalidInput(e.to_string()));
    field(&json(serde_json::to_vec(config))?);
    // Not part of the build config's JSON (an engine records it at the top of config.json).
    field(&json(serde_json::to_vec(&config.mapping))?);
    field(env!("CARGO_PKG_VERSION").as_bytes());
    let digest = h.finalize();
    Ok(digest[..16].iter().map(|b| format!("{b:02x}")).collect())
}
