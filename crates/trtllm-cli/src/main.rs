//! `trtllm`: a thin command line over the trtllm-api library.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use trtllm_api::builder::{self, BuildConfig};
use trtllm_api::executor::{CapacitySchedulerPolicy, ExecutorConfig};
use trtllm_api::runtime::{quant::DType, Session};
use trtllm_api::{ChatMessage, LlmArgs, Prompt, SamplingParams, LLM};

#[derive(Parser)]
#[command(name = "trtllm", version, about = "Build and run LLM engines")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build an engine from a Hugging Face directory or a .gguf file.
    Build(BuildArgs),
    /// Generate from a prompt.
    Run(RunArgs),
    /// Perplexity of a text or token ids under the model.
    Perplexity(PerplexityArgs),
    /// Show an engine's config and weights.
    Inspect { engine: PathBuf },
}

#[derive(Args)]
struct BuildArgs {
    #[arg(long)]
    checkpoint: PathBuf,
    #[arg(long)]
    output: PathBuf,
    /// float32, bfloat16 or float16 (default: the checkpoint's own; float32 for GGUF).
    #[arg(long)]
    dtype: Option<String>,
    #[arg(long, default_value_t = 8)]
    max_batch_size: usize,
    /// Default: the model's maximum position.
    #[arg(long, default_value_t = 0)]
    max_seq_len: usize,
    #[arg(long, default_value_t = 8192)]
    max_num_tokens: usize,
}

#[derive(Args)]
struct RunArgs {
    #[arg(long)]
    engine: PathBuf,
    /// Repeat for several prompts; they run concurrently through the executor.
    #[arg(long, conflicts_with = "input")]
    prompt: Vec<String>,
    /// One prompt per line (blank lines skipped), run concurrently.
    #[arg(long, conflicts_with = "input")]
    prompts_file: Option<PathBuf>,
    /// Sent as one user message through the chat template.
    #[arg(long, group = "input")]
    chat: Option<String>,
    /// Comma-separated token ids.
    #[arg(long, group = "input", value_delimiter = ',')]
    input_ids: Option<Vec<u32>>,
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long)]
    ignore_eos: bool,
    /// Print one RequestOutput as JSON per line instead of streaming text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    executor: ExecutorArgs,
}

/// How the executor batches; the defaults come from the engine.
#[derive(Args)]
struct ExecutorArgs {
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
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Policy {
    GuaranteedNoEvict,
    MaxUtilization,
}

impl ExecutorArgs {
    fn config(&self) -> ExecutorConfig {
        let mut cfg = ExecutorConfig::default();
        cfg.scheduler.max_batch_size = self.max_batch_size;
        cfg.scheduler.max_num_tokens = self.max_num_tokens;
        cfg.scheduler.policy = match self.scheduler_policy {
            Policy::GuaranteedNoEvict => CapacitySchedulerPolicy::GuaranteedNoEvict,
            Policy::MaxUtilization => CapacitySchedulerPolicy::MaxUtilization,
        };
        cfg.kv_cache.max_tokens = self.kv_cache_tokens;
        cfg.kv_cache.enable_block_reuse = !self.disable_block_reuse;
        cfg
    }
}

#[derive(Args)]
struct PerplexityArgs {
    #[arg(long)]
    engine: PathBuf,
    #[arg(long, group = "src", required = true)]
    text_file: Option<PathBuf>,
    /// Token ids separated by whitespace or commas.
    #[arg(long, group = "src")]
    input_ids_file: Option<PathBuf>,
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Build(a) => build(a),
        Command::Run(a) => generate(a),
        Command::Perplexity(a) => perplexity(a),
        Command::Inspect { engine } => inspect(&engine),
    }
}

fn build(a: BuildArgs) -> Result<()> {
    let dtype = a
        .dtype
        .as_deref()
        .map(DType::parse)
        .transpose()
        .context("--dtype")?;
    let config = BuildConfig {
        max_batch_size: a.max_batch_size,
        max_seq_len: a.max_seq_len,
        max_num_tokens: a.max_num_tokens,
        dtype,
        ..BuildConfig::default()
    };
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} {msg:14} [{bar:40}] {pos}/{len} {elapsed}",
        )
        .expect("static template")
        .progress_chars("=> "),
    );
    let start = std::time::Instant::now();
    let engine = builder::build(
        &a.checkpoint,
        &a.output,
        &config,
        &mut |done, total, what| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
            bar.set_message(what.to_string());
        },
    );
    bar.finish_and_clear();
    let engine = engine?;
    eprintln!(
        "built {} ({} layers, {}) into {} in {:.1}s",
        engine.model.architecture,
        engine.model.num_layers,
        engine.build.dtype.map_or("float32", DType::name),
        a.output.display(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

fn open(engine: &Path, executor_config: ExecutorConfig) -> Result<LLM> {
    Ok(LLM::new(LlmArgs {
        model: engine.to_path_buf(),
        executor_config,
        ..LlmArgs::default()
    })?)
}

fn generate(a: RunArgs) -> Result<()> {
    let params = SamplingParams {
        max_tokens: a.max_tokens,
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        seed: a.seed,
        ignore_eos: a.ignore_eos,
        ..SamplingParams::default()
    };
    params.validate()?;
    let mut prompts: Vec<Prompt> = a.prompt.iter().cloned().map(Prompt::Text).collect();
    if let Some(f) = &a.prompts_file {
        let text = std::fs::read_to_string(f).with_context(|| f.display().to_string())?;
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
    if prompts.is_empty() && a.chat.is_none() {
        bail!("one of --prompt, --prompts-file, --chat or --input-ids is required");
    }
    let llm = open(&a.engine, a.executor.config())?;
    let stream_text = !a.json && params.n == 1 && prompts.len() + a.chat.iter().len() == 1;
    if !stream_text {
        let outs = match &a.chat {
            Some(c) => vec![llm.chat(&[ChatMessage::new("user", c)], &params)?],
            None => llm.generate(&prompts, &params)?,
        };
        for (i, out) in outs.iter().enumerate() {
            if a.json {
                println!("{}", serde_json::to_string(out)?);
                continue;
            }
            for o in &out.outputs {
                println!("[{i}.{}] {}", o.index, o.text);
            }
        }
        return Ok(());
    }
    let mut stream = match (prompts.pop(), &a.chat) {
        (Some(p), _) => llm.generate_async(p, &params)?,
        (_, Some(c)) => llm.chat_async(&[ChatMessage::new("user", c)], &params)?,
        (None, None) => unreachable!("checked above"),
    };
    let mut stdout = std::io::stdout();
    while let Some(delta) = stream.next_delta() {
        stdout.write_all(delta?.text.as_bytes())?;
        stdout.flush()?;
    }
    println!();
    Ok(())
}

fn perplexity(a: PerplexityArgs) -> Result<()> {
    let llm = open(&a.engine, ExecutorConfig::default())?;
    let ids = match (&a.text_file, &a.input_ids_file) {
        (Some(f), _) => {
            let text = std::fs::read_to_string(f).with_context(|| f.display().to_string())?;
            llm.tokenizer()?.encode(&text, true)?
        }
        (_, Some(f)) => parse_ids(f)?,
        _ => bail!("one of --text-file or --input-ids-file is required"),
    };
    let p = llm.perplexity(&ids)?;
    println!(
        "{}",
        serde_json::json!({"tokens": p.tokens, "mean_nll": p.mean_nll, "perplexity": p.perplexity})
    );
    Ok(())
}

fn parse_ids(path: &Path) -> Result<Vec<u32>> {
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    text.split(|c: char| c.is_whitespace() || c == ',')
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<u32>()
                .with_context(|| format!("{}: '{s}' is not a token id", path.display()))
        })
        .collect()
}

fn inspect(engine: &Path) -> Result<()> {
    let session = Session::open(engine)?;
    let cfg = session.config();
    println!(
        "{}",
        serde_json::to_string_pretty(&serde_json::json!({"model": cfg.model, "build": cfg.build}))?
    );
    let tensors = session.tensors();
    let params: usize = tensors
        .iter()
        .map(|t| t.shape.iter().product::<usize>())
        .sum();
    println!(
        "\n{:<32} {:<9} {:>16} {:>12}",
        "tensor", "dtype", "shape", "bytes"
    );
    for t in &tensors {
        println!(
            "{:<32} {:<9} {:>16} {:>12}",
            t.name,
            t.dtype.name(),
            format!("{:?}", t.shape),
            t.bytes
        );
    }
    println!(
        "\n{} tensors, {:.2} M parameters, engine file {:.1} MiB",
        tensors.len(),
        params as f64 / 1e6,
        session.engine_bytes() as f64 / (1 << 20) as f64
    );
    Ok(())
}
