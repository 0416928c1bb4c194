//! `trtllm run`: generate from prompts, streaming text or printing `RequestOutput` JSON; and
//! the sampling and executor flags other commands share.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use trtllm_api::builder::BuildConfig;
use trtllm_api::executor::{CapacitySchedulerPolicy, ExecutorConfig, SpeculativeConfig};
use trtllm_api::runtime::parallel::Mapping;
use trtllm_api::runtime::Device;
use trtllm_api::{
    ChatMessage, EarlyStopping, LlmArgs, LoRARequest, Logprob, Prompt, SamplingParams, LLM,
};

/// The model a command runs: an engine directory, a Hugging Face checkpoint directory or a
/// .gguf file, as the first argument or `--model` (`--engine` is the older spelling).
#[derive(Args, Clone)]
pub struct ModelArg {
    #[arg(value_name = "MODEL")]
    model: Option<PathBuf>,
    #[arg(
        long = "model",
        visible_alias = "engine",
        value_name = "MODEL",
        conflicts_with = "model"
    )]
    flag: Option<PathBuf>,
    /// A checkpoint or GGUF is built split over this many tensor-parallel ranks (its engine
    /// cached like any other); trtllm starts the ranks with `mpirun` unless run under it.
    #[arg(long, default_value_t = 1)]
    tp_size: usize,
    /// ... and this many pipeline stages.
    #[arg(long, default_value_t = 1)]
    pp_size: usize,
}

impl ModelArg {
    pub fn get(&self) -> Option<&Path> {
        self.model.as_deref().or(self.flag.as_deref())
    }

    pub fn path(&self) -> Result<&Path> {
        self.get()
            .context("a model is required: an engine directory, checkpoint directory or .gguf file, as the first argument or --model")
    }

    /// The split asked for with `--tp-size` / `--pp-size`.
    pub fn mapping(&self) -> Result<Mapping> {
        Mapping::new(self.tp_size, self.pp_size).context("--tp-size/--pp-size")
    }

    /// What builds (or finds) and opens the model, with `executor_config` on `device`.
    fn llm_args(&self, executor_config: ExecutorConfig, device: Device) -> Result<LlmArgs> {
        Ok(LlmArgs {
            model: self.path()?.to_path_buf(),
            build_config: BuildConfig {
                mapping: self.mapping()?,
                ..BuildConfig::default()
            },
            executor_config,
            device,
            ..LlmArgs::default()
        })
    }

    /// Builds a checkpoint into the engine cache now, unless built before (a split one once,
    /// before its ranks start and rank 0 finds it there).
    pub fn build_now(&self) -> Result<()> {
        let (_, built) = self
            .llm_args(ExecutorConfig::default(), Device::Cpu)?
            .resolve_engine()?;
        if let Some(note) = built {
            eprintln!("{note}");
        }
        Ok(())
    }
}

#[derive(Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub(crate) model: ModelArg,
    /// Repeat for several prompts; they run concurrently through the executor.
    #[arg(long, conflicts_with = "input")]
    prompt: Vec<String>,
    /// One prompt per line (blank lines skipped), run concurrently; `-` reads standard input.
    #[arg(long, conflicts_with = "input")]
    prompts_file: Option<PathBuf>,
    /// Sent as one user message through the chat template.
    #[arg(long, group = "input")]
    chat: Option<String>,
    /// A system message before --chat's user message.
    #[arg(long, requires = "chat")]
    system: Option<String>,
    /// A Jinja chat template file used instead of the checkpoint's.
    #[arg(long, value_name = "FILE")]
    chat_template: Option<PathBuf>,
    /// Comma-separated token ids.
    #[arg(long, group = "input", value_delimiter = ',')]
    input_ids: Option<Vec<u32>>,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Print one RequestOutput as JSON per line instead of streaming text.
    #[arg(long)]
    json: bool,
    /// With --json: the logits at every prompt position (`context_logits`, one row per token).
    #[arg(long)]
    return_context_logits: bool,
    /// With --json: the logits each output token was sampled from (`generation_logits`).
    #[arg(long)]
    return_generation_logits: bool,
    #[command(flatten)]
    executor: ExecutorArgs,
}

/// `SamplingParams` as flags; ranges are checked by `SamplingParams::validate`.
#[derive(Args)]
pub struct SamplingArgs {
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    #[arg(long, default_value_t = 0)]
    min_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    presence_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    frequency_penalty: f32,
    /// Text that ends generation (repeat for several); not included in the output.
    #[arg(long)]
    stop: Vec<String>,
    #[arg(long)]
    ignore_eos: bool,
    /// Completions per prompt.
    #[arg(long, default_value_t = 1)]
    n: usize,
    /// Return the log-probabilities of each output token and the top K alternatives.
    #[arg(long, value_name = "K")]
    logprobs: Option<usize>,
    /// Beam search over N beams instead of sampling; the best --n of them are returned, each
    /// with its cumulative log-probability.
    #[arg(long, value_name = "N")]
    beam_width: Option<usize>,
    /// Beam search ranks finished beams by sum_logprobs / length^X.
    #[arg(long, value_name = "X", requires = "beam_width")]
    length_penalty: Option<f32>,
    /// When the beam search stops: true (as soon as N beams are finished), false (the default:
    /// when no running beam can beat them) or never; the flag alone means true.
    #[arg(long, value_name = "WHEN", requires = "beam_width", num_args = 0..=1,
          default_missing_value = "true", value_parser = parse_early_stopping)]
    early_stopping: Option<EarlyStopping>,
    /// Run with this LoRA adapter: a PEFT directory (adapter_config.json and
    /// adapter_model.safetensors) made for the engine's base model.
    #[arg(long, value_name = "DIR")]
    lora: Option<PathBuf>,
}

fn parse_early_stopping(s: &str) -> std::result::Result<EarlyStopping, String> {
    match s {
        "true" => Ok(EarlyStopping::Bool(true)),
        "false" => Ok(EarlyStopping::Bool(false)),
        "never" => Ok(EarlyStopping::Never(Default::default())),
        other => Err(format!("'{other}' is not one of true, false, never")),
    }
}

impl SamplingArgs {
    pub fn params(&self) -> Result<SamplingParams> {
        let p = SamplingParams {
            max_tokens: self.max_tokens,
            min_tokens: self.min_tokens,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            seed: self.seed,
            repetition_penalty: self.repetition_penalty,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            stop: self.stop.clone(),
            ignore_eos: self.ignore_eos,
            n: self.n,
            logprobs: self.logprobs,
            use_beam_search: self.beam_width.is_some(),
            beam_width: self.beam_width,
            length_penalty: self.length_penalty.unwrap_or(1.0),
            early_stopping: self.early_stopping.unwrap_or_default(),
            lora_request: self.lora.as_ref().map(|path| LoRARequest {
                name: path.file_name().map_or_else(
                    || path.display().to_string(),
                    |n| n.to_string_lossy().into(),
                ),
                id: 1,
                path: path.clone(),
            }),
            ..SamplingParams::default()
        };
        p.validate()?;
        Ok(p)
    }
}

/// How the executor batches; the defaults come from the engine.
#[derive(Args)]
pub struct ExecutorArgs {
    /// Requests per step (at most the engine's max_batch_size).
    #[arg(long)]
    max_batch_size: Option<usize>,
    /// Tokens per step, prompt chunks included (at most the engine's max_num_tokens).
    #[arg(long)]
    max_num_tokens: Option<usize>,
    /// KV-cache pool size in tokens (default: max_batch_size full-length sequences).
    #[arg(long)]
    kv_cache_tokens: Option<usize>,
    #[arg(long, value_enum, default_value_t = Policy::GuaranteedNoEvict)]
    scheduler_policy: Policy,
    /// Do not share KV blocks between prompts with a common prefix.
    #[arg(long)]
    disable_block_reuse: bool,
    /// Where the model runs: cpu, cuda or cuda:N (CUDA needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    pub device: Device,
    /// A timing cache (as `trtllm build --timing-cache` writes): the CPU kernels take its
    /// tactics for this machine; what it lacks is timed at start and added to it.
    #[arg(long)]
    timing_cache: Option<PathBuf>,
    /// Speculative decoding by prompt lookup: draft the tokens that followed the latest earlier
    /// occurrence of the sequence's last N tokens (N down to 1), verify them in one pass.
    #[arg(long, value_name = "N", group = "speculation")]
    ngram_lookup: Option<usize>,
    /// Speculative decoding with a draft model (an engine, checkpoint or GGUF with the target's
    /// vocabulary) that proposes tokens greedily.
    #[arg(long, value_name = "MODEL", group = "speculation")]
    draft_model: Option<PathBuf>,
    /// Most draft tokens per step for speculative decoding.
    #[arg(long, value_name = "K", requires = "speculation", default_value_t = 4)]
    max_draft_len: usize,
    /// Each request's logits bit for bit the same whatever else is in its batch and however
    /// its prompt is chunked (costs throughput).
    #[arg(long)]
    batch_invariant: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Policy {
    GuaranteedNoEvict,
    MaxUtilization,
}

impl ExecutorArgs {
    pub fn config(&self) -> ExecutorConfig {
        let mut cfg = ExecutorConfig::default();
        cfg.scheduler.max_batch_size = self.max_batch_size;
        cfg.scheduler.max_num_tokens = self.max_num_tokens;
        cfg.scheduler.policy = match self.scheduler_policy {
            Policy::GuaranteedNoEvict => CapacitySchedulerPolicy::GuaranteedNoEvict,
            Policy::MaxUtilization => CapacitySchedulerPolicy::MaxUtilization,
        };
        cfg.kv_cache.max_tokens = self.kv_cache_tokens;
        cfg.kv_cache.enable_block_reuse = !self.disable_block_reuse;
        cfg.batch_invariant = self.batch_invariant;
        cfg.timing_cache = self.timing_cache.clone();
        let max_draft_len = self.max_draft_len;
        cfg.speculative = match (self.ngram_lookup, &self.draft_model) {
            (Some(n), _) => Some(SpeculativeConfig::NGram {
                max_draft_len,
                max_matching_ngram_size: n,
            }),
            (None, Some(dir)) => Some(SpeculativeConfig::DraftTarget {
                max_draft_len,
                speculative_model: dir.clone(),
            }),
            (None, None) => None,
        };
        cfg
    }
}

/// Opens an engine (building a checkpoint into the cache first if that is what `model` is, and
/// saying so once on stderr), with `chat_template` (a Jinja file) instead of the checkpoint's.
pub fn open(
    model: &ModelArg,
    executor_config: ExecutorConfig,
    device: Device,
    chat_template: Option<&Path>,
) -> Result<LLM> {
    let chat_template = chat_template
        .map(|f| {
            std::fs::read_to_string(f).with_context(|| format!("--chat-template {}", f.display()))
        })
        .transpose()?;
    let llm = LLM::new(LlmArgs {
        chat_template,
        ..model.llm_args(executor_config, device)?
    })?;
    if let Some(note) = llm.built() {
        eprintln!("{note}");
    }
    Ok(llm)
}

pub fn generate(a: RunArgs) -> Result<()> {
    let mut params = a.sampling.params()?;
    if (a.return_context_logits || a.return_generation_logits) && !a.json {
        bail!("--return-context-logits and --return-generation-logits print with --json only");
    }
    params.return_context_logits = a.return_context_logits;
    params.return_generation_logits = a.return_generation_logits;
    let mut prompts: Vec<Prompt> = a.prompt.iter().cloned().map(Prompt::Text).collect();
    if let Some(f) = &a.prompts_file {
        let text = match f.to_str() {
            Some("-") => std::io::read_to_string(std::io::stdin()).context("reading stdin")?,
            _ => std::fs::read_to_string(f).with_context(|| f.display().to_string())?,
        };
        prompts.extend(
            text.lines()
                .filter(|l| !l.trim().is_empty())
                .map(|l| Prompt::Text(l.to_string())),
        );
        if prompts.is_empty() {
            bail!("{}: no prompts (one per line expected)", f.display());
        }
    }
    if let Some(ids) = a.input_ids {
        prompts.push(Prompt::TokenIds(ids));
    }
    let chat = a.chat.map(|c| {
        let system = a.system.iter().map(|s| ChatMessage::new("system", s));
        system
            .chain([ChatMessage::new("user", &c)])
            .collect::<Vec<_>>()
    });
    if prompts.is_empty() && chat.is_none() {
        bail!("one of --prompt, --prompts-file, --chat or --input-ids is required");
    }
    let llm = open(
        &a.model,
        a.executor.config(),
        a.executor.device,
        a.chat_template.as_deref(),
    )?;
    // A beam search's completions are known only at its end: nothing to stream.
    if a.json || params.n > 1 || prompts.len() > 1 || params.use_beam_search {
        let outs = match &chat {
            Some(messages) => vec![llm.chat(messages, &params)?],
            None => llm.generate(&prompts, &params)?,
        };
        for (i, out) in outs.iter().enumerate() {
            if a.json {
                println!("{}", serde_json::to_string(out)?);
                continue;
            }
            for o in &out.outputs {
                match o.cumulative_logprob.filter(|_| params.use_beam_search) {
                    Some(c) => println!("[{i}.{}] ({c:.4}) {}", o.index, o.text),
                    None => println!("[{i}.{}] {}", o.index, o.text),
                }
                if let Some(lp) = &o.logprobs {
                    print_logprobs(&llm, lp)?;
                }
            }
        }
        return Ok(());
    }
    let mut stream = match (prompts.pop(), &chat) {
        (Some(p), _) => llm.generate_async(p, &params)?,
        (None, Some(messages)) => llm.chat_async(messages, &params)?,
        (None, None) => bail!("no prompt"),
    };
    let mut stdout = std::io::stdout();
    let mut logprobs = Vec::new();
    while let Some(delta) = stream.next_delta() {
        let delta = delta?;
        stdout.write_all(delta.text.as_bytes())?;
        stdout.flush()?;
        logprobs.extend(delta.logprobs);
    }
    println!();
    if params.logprobs.is_some() {
        print_logprobs(&llm, &logprobs)?;
    }
    Ok(())
}

/// One line per generated token: its id, text and log-probability, then the alternatives.
fn print_logprobs(llm: &LLM, logprobs: &[Logprob]) -> Result<()> {
    let tok = llm.tokenizer()?;
    let text = |id: u32| tok.decode(&[id], false).map(|t| format!("{t:?}"));
    let mut out = std::io::stdout().lock();
    for (i, l) in logprobs.iter().enumerate() {
        write!(
            out,
            "{i:4} {:6} {:16} {:9.4}",
            l.token_id,
            text(l.token_id)?,
            l.logprob
        )?;
        for t in &l.top {
            write!(
                out,
                "  {} {} {:.4}",
                t.token_id,
                text(t.token_id)?,
                t.logprob
            )?;
        }
        writeln!(out)?;
    }
    Ok(())
}
