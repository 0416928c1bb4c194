//! `trtllm`: a thin command line over the trtllm-api library.

mod bench;
mod chat;
mod ranks;
mod router;
mod run;
mod serve;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use trtllm_api::builder::{self, BuildConfig};
use trtllm_api::executor::ExecutorConfig;
use trtllm_api::runtime::engine::EngineFile;
use trtllm_api::runtime::parallel::Mapping;
use trtllm_api::runtime::quant::{DType, LayerQuantConfig, QuantAlgo, QuantConfig};
use trtllm_api::runtime::{Device, EngineConfig, KvStorage, Session, TimingCache};

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
    #[command(allow_negative_numbers = true)]
    Run(run::RunArgs),
    /// Talk with the model: each line you type is a user turn, answered through the chat
    /// template with the conversation so far (/reset forgets it, /exit or end of input quits).
    #[command(allow_negative_numbers = true)]
    Chat(chat::ChatArgs),
    /// Serve the model over an OpenAI-compatible HTTP API.
    Serve(serve::ServeArgs),
    /// Route OpenAI requests over several `trtllm serve` replicas, each to the one caching the
    /// longest prefix of its prompt.
    Router(router::RouterArgs),
    /// Measure throughput and latency, in process or against a running server.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Perplexity of a text or token ids under the model.
    Perplexity(PerplexityArgs),
    /// Show an engine's config and weights.
    Inspect(run::ModelArg),
}

#[derive(Args)]
struct BuildArgs {
    #[arg(long)]
    checkpoint: PathBuf,
    #[arg(long)]
    output: PathBuf,
    /// Replace an engine (or anything else) already at --output.
    #[arg(long)]
    force: bool,
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
    /// Widest beam search a request may ask for.
    #[arg(long, default_value_t = 4)]
    max_beam_width: usize,
    /// Highest rank of a LoRA adapter requests may run with.
    #[arg(long, default_value_t = 64)]
    max_lora_rank: usize,
    /// LoRA adapters on the device at once: the most distinct adapters one step runs.
    #[arg(long, default_value_t = 4)]
    max_loras: usize,
    /// LoRA adapters kept read and checked in host memory.
    #[arg(long, default_value_t = 8)]
    max_cpu_loras: usize,
    /// A PEFT LoRA adapter to merge into the weights (with --merge-lora): the engine is that
    /// fine-tune, at no run-time cost.
    #[arg(long, value_name = "DIR", requires = "merge_lora")]
    lora: Option<std::path::PathBuf>,
    /// Merge --lora into the weights before any quantization.
    #[arg(long, requires = "lora")]
    merge_lora: bool,
    /// Weight quantization: w8a16, w4a16, w4a16_awq, w4a16_gptq, w8a16_gptq, w8a8_sq, fp8,
    /// nvfp4, or keep (a GGUF's own Q8_0/Q4_0/Q4_1 weights, without loss).
    #[arg(long)]
    quant: Option<String>,
    /// Values per scale group of 4-bit weights (default 128).
    #[arg(long)]
    group_size: Option<usize>,
    /// KV-cache quantization: int8 or fp8.
    #[arg(long)]
    kv_cache_quant: Option<String>,
    /// Float storage of an unquantized KV cache: float32 (default), bfloat16 or float16.
    #[arg(long)]
    kv_cache_dtype: Option<String>,
    /// Time the CPU kernels' tactics for this engine on this machine into this timing cache
    /// (created if missing; entries it has are reused). `run`/`serve`/`bench --timing-cache`
    /// read it.
    #[arg(long)]
    timing_cache: Option<PathBuf>,
    /// Calibration text for AWQ, GPTQ, SmoothQuant and FP8 (default: a built-in English text).
    #[arg(long)]
    calib_text: Option<PathBuf>,
    /// Calibrate on at most this many sequences of --calib-max-seq-len tokens (default 64).
    #[arg(long)]
    calib_size: Option<usize>,
    /// Tokens per calibration sequence (default 512).
    #[arg(long)]
    calib_max_seq_len: Option<usize>,
    /// Per-channel activation scaling (AWQ/SmoothQuant scales, an AWQ-style scale search for
    /// FP8 and NVFP4). Default: on for w4a16_awq, w8a8_sq and nvfp4; false gives plain W8A8/NVFP4.
    #[arg(long)]
    pre_quant_scale: Option<bool>,
    /// Modules to leave unquantized: any whose name contains one of these (e.g. lm_head,layers.0.).
    #[arg(long, value_delimiter = ',')]
    exclude_modules: Vec<String>,
    /// Tensor parallelism: each layer's heads, MLP columns and the vocabulary split over this
    /// many ranks (one file each; run with `mpirun -np TP×PP trtllm ...`).
    #[arg(long, default_value_t = 1)]
    tp_size: usize,
    /// Pipeline parallelism: the layers split into this many stages.
    #[arg(long, default_value_t = 1)]
    pp_size: usize,
}

#[derive(Args)]
struct PerplexityArgs {
    #[command(flatten)]
    model: run::ModelArg,
    #[arg(long, group = "src", required = true)]
    text_file: Option<PathBuf>,
    /// Token ids separated by whitespace or commas.
    #[arg(long, group = "src")]
    input_ids_file: Option<PathBuf>,
    /// Where the model runs: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: Device,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The server logs its start and each request; other commands only what goes wrong.
    init_logging(match cli.command {
        Command::Serve(_) | Command::Router(_) => "info",
        _ => "warn",
    });
    // A split engine outside an `mpirun` job: the command becomes its ranks' (exec of mpirun).
    if let Some(model) = cli.command.model() {
        if let Err(e) = ranks::relaunch(model) {
            eprintln!("error: {}", report(&e));
            return ExitCode::FAILURE;
        }
    }
    match ranks::run(|| run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        // The reader went away (`| head`): nothing is wrong with the command.
        Err(e) if broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", report(&e));
            ExitCode::FAILURE
        }
    }
}

/// Log events of the libraries (`tracing`) to stderr, filtered by `RUST_LOG` (else `default`).
fn init_logging(default: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// The error and its causes, each once: our errors already end with their source's text (a
/// path, then the OS's reason), which `{:#}` would print a second time.
fn report(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.ends_with(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

fn broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

impl Command {
    /// The model a command opens in process, if any.
    fn model(&self) -> Option<&run::ModelArg> {
        let model = match self {
            Command::Run(a) => &a.model,
            Command::Chat(a) => &a.model,
            Command::Serve(a) => &a.model,
            Command::Bench(
                bench::BenchCommand::Throughput(a) | bench::BenchCommand::Latency(a),
            ) => &a.model,
            Command::Perplexity(a) => &a.model,
            _ => return None,
        };
        model.get().is_some().then_some(model)
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Build(a) => build(a),
        Command::Run(a) => run::generate(a),
        Command::Chat(a) => chat::chat(a),
        Command::Serve(a) => serve::serve(a),
        Command::Router(a) => router::router(a),
        Command::Bench(b) => bench::run(b),
        Command::Perplexity(a) => perplexity(a),
        Command::Inspect(m) => inspect(m.path()?),
    }
}

fn build(a: BuildArgs) -> Result<()> {
    let parse = |v: &Option<String>, flag| v.as_deref().map(DType::parse).transpose().context(flag);
    let dtype = parse(&a.dtype, "--dtype")?;
    let kv_cache_dtype = parse(&a.kv_cache_dtype, "--kv-cache-dtype")?;
    let (quant, keep_quantized) = quant_config(&a)?;
    let config = BuildConfig {
        max_batch_size: a.max_batch_size,
        max_seq_len: a.max_seq_len,
        max_num_tokens: a.max_num_tokens,
        dtype,
        quant,
        keep_quantized,
        kv_cache_dtype,
        max_beam_width: a.max_beam_width,
        max_lora_rank: a.max_lora_rank,
        max_loras: a.max_loras,
        max_cpu_loras: a.max_cpu_loras,
        merge_lora: a.lora.clone().filter(|_| a.merge_lora),
        mapping: Mapping::new(a.tp_size, a.pp_size).context("--tp-size/--pp-size")?,
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
    let occupied =
        std::fs::read_dir(&a.output).map_or(a.output.exists(), |mut d| d.next().is_some());
    if occupied && !a.force {
        bail!(
            "{} already exists; give --force to replace it",
            a.output.display()
        );
    }
    let start = std::time::Instant::now();
    let mut last = String::new();
    let engine = builder::build(
        &a.checkpoint,
        &a.output,
        &config,
        &mut |done, total, what| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
            bar.set_message(what.to_string());
            last = what.to_string();
        },
    );
    bar.finish_and_clear();
    let engine = engine?;
    let quant = &engine.build.quant;
    let weights = match (engine.build.keep_quantized, quant.quant_algo()) {
        (true, _) => "checkpoint's quantized weights kept".to_string(),
        (false, QuantAlgo::NoQuant) => engine.build.dtype.map_or("float32", DType::name).into(),
        // The builder's last message is its quantization report.
        (false, algo) => format!("{algo}, {}", last.trim_start_matches("done: ")),
    };
    eprintln!(
        "built {} ({} layers, {weights}, KV cache {}) into {} in {:.1}s",
        engine.model.architecture,
        engine.model.num_layers,
        KvStorage::of(&engine.build).name(),
        a.output.display(),
        start.elapsed().as_secs_f64()
    );
    match &a.timing_cache {
        // Its ranks run one thread each under mpirun: timed here, with this process's threads,
        // the entries would not be theirs.
        Some(path) if engine.mapping.is_parallel() => eprintln!(
            "timing cache {}: a split engine's ranks tune their shards when they start (give \
             --timing-cache to run, serve or bench)",
            path.display()
        ),
        Some(path) => tune(&a.output, path)?,
        None => {}
    }
    Ok(())
}

/// Times the CPU kernels' tactics for the engine in `dir` on this machine into the timing cache
/// at `path` (entries it already has are reused).
fn tune(dir: &Path, path: &Path) -> Result<()> {
    let mut cache = TimingCache::open(path)?;
    let mut runner = Session::open(dir)?.model_runner()?;
    let r = runner.tune(&mut cache, trtllm_api::executor::TUNE_BUDGET)?;
    cache.save()?;
    eprintln!(
        "timing cache {}: {} entries timed in {:.1}s, {} reused{}",
        path.display(),
        r.tuned,
        r.seconds,
        r.cached,
        match r.skipped {
            0 => String::new(),
            n => format!(", {n} left at the default (time budget spent)"),
        }
    );
    Ok(())
}

fn quant_config(a: &BuildArgs) -> Result<(LayerQuantConfig, bool)> {
    let keep = a.quant.as_deref() == Some("keep");
    let algo = match a.quant.as_deref() {
        None | Some("keep") => QuantAlgo::NoQuant,
        Some(q) => QuantAlgo::parse(q).context("--quant")?,
    };
    let mut c = QuantConfig::for_algo(algo);
    if let Some(g) = a.group_size {
        c.group_size = g;
    }
    if let Some(kv) = &a.kv_cache_quant {
        c.kv_cache_quant_algo = QuantAlgo::parse(kv).context("--kv-cache-quant")?;
    }
    c.calib_dataset = a.calib_text.as_ref().map(|p| p.display().to_string());
    if let Some(n) = a.calib_size {
        c.calib_size = n;
    }
    if let Some(n) = a.calib_max_seq_len {
        c.calib_max_seq_length = n;
    }
    if let Some(on) = a.pre_quant_scale {
        c.pre_quant_scale = on;
    }
    if !a.exclude_modules.is_empty() {
        c.exclude_modules = Some(a.exclude_modules.clone());
    }
    c.validate()?;
    Ok((LayerQuantConfig::uniform(c), keep))
}

fn perplexity(a: PerplexityArgs) -> Result<()> {
    let llm = run::open(&a.model, ExecutorConfig::default(), a.device, None)?;
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
    let cfg = EngineConfig::read(engine)?;
    // Written with `?`, not println!, so a closed pipe (`trtllm inspect E | head`) ends the
    // command quietly instead of panicking.
    let mut out = std::io::stdout().lock();
    let head = serde_json::json!({"model": cfg.model, "build": cfg.build, "mapping": cfg.mapping});
    writeln!(out, "{}", serde_json::to_string_pretty(&head)?)?;
    // Every rank's file, checked and listed (a split engine is inspected without its ranks).
    for rank in &cfg.ranks {
        let file = EngineFile::open(engine, rank)?;
        if cfg.mapping.is_parallel() {
            writeln!(out, "\n{}", rank.file)?;
        }
        inspect_file(&mut out, &file)?;
    }
    Ok(())
}

/// The tensors of one rank file, and a summary.
fn inspect_file(out: &mut impl Write, file: &EngineFile) -> Result<()> {
    writeln!(
        out,
        "\n{:<36} {:<16} {:>16} {:>12}",
        "tensor", "format", "shape", "bytes"
    )?;
    let (mut packed, mut matrices, mut weight_bytes) = (0, 0, 0);
    for t in file.tensors() {
        let format = t
            .format
            .map_or_else(|| t.dtype.name().to_string(), |f| f.describe());
        packed += usize::from(t.format.is_some());
        matrices += usize::from(t.name.ends_with(".weight") && t.shape.len() == 2);
        weight_bytes += t.bytes;
        writeln!(
            out,
            "{:<36} {:<16} {:>16} {:>12}",
            t.name,
            format,
            format!("{:?}", t.shape),
            t.bytes
        )?;
    }
    writeln!(
        out,
        "\n{} tensors, {packed}/{matrices} weight matrices quantized, {:.1} MiB of weights, engine file {:.1} MiB",
        file.tensors().count(),
        weight_bytes as f64 / (1 << 20) as f64,
        file.len() as f64 / (1 << 20) as f64
    )?;
    Ok(())
}
