//! `trtllm`: a thin command line over the trtllm-api library.

mod bench;
mod run;
mod serve;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use trtllm_api::builder::{self, BuildConfig};
use trtllm_api::executor::ExecutorConfig;
use trtllm_api::runtime::{quant::DType, Session};

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
    Run(run::RunArgs),
    /// Serve the model over an OpenAI-compatible HTTP API.
    Serve(serve::ServeArgs),
    /// Measure throughput and latency, in process or against a running server.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
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
        Command::Run(a) => run::generate(a),
        Command::Serve(a) => serve::serve(a),
        Command::Bench(b) => bench::run(b),
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

fn perplexity(a: PerplexityArgs) -> Result<()> {
    let llm = run::open(&a.engine, ExecutorConfig::default())?;
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
