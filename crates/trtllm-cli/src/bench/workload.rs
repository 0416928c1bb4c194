//! What a benchmark runs: requests from a JSONL dataset or synthetic ones of fixed lengths.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde::Deserialize;
use trtllm_api::LoRARequest;

#[derive(Args)]
pub struct WorkloadArgs {
    /// JSONL, one request per line: {"input_ids": [...]} or {"prompt": "..."}, with
    /// "output_tokens" (or "max_tokens"); TensorRT-LLM's prepare_dataset format.
    #[arg(long)]
    dataset: Option<PathBuf>,
    /// Requests to run (synthetic; with --dataset, at most the dataset's first N).
    #[arg(long)]
    num_requests: Option<usize>,
    /// Synthetic prompt length in tokens.
    #[arg(long, default_value_t = 128)]
    input_len: usize,
    /// Output tokens per request (EOS is ignored so every request produces exactly this many).
    #[arg(long, default_value_t = 128)]
    output_len: usize,
    /// Seed of the synthetic prompts' token ids.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// LoRA adapters (PEFT directories; repeat for several) the requests run with, in turn:
    /// request i takes adapter i mod their number (in process only).
    #[arg(long, value_name = "DIR")]
    lora: Vec<PathBuf>,
}

#[derive(Clone, Debug)]
pub enum Input {
    Ids(Vec<u32>),
    Text(String),
}

#[derive(Clone, Debug)]
pub struct BenchRequest {
    pub input: Input,
    pub output_tokens: usize,
    pub lora: Option<LoRARequest>,
}

pub struct Workload {
    pub requests: Vec<BenchRequest>,
}

#[derive(Deserialize)]
struct Line {
    input_ids: Option<Vec<u32>>,
    prompt: Option<String>,
    output_tokens: Option<usize>,
    max_tokens: Option<usize>,
}

impl WorkloadArgs {
    pub fn uses_lora(&self) -> bool {
        !self.lora.is_empty()
    }
}

impl Workload {
    pub fn build(a: &WorkloadArgs, vocab_size: usize) -> Result<Self> {
        let requests = match &a.dataset {
            Some(path) => read_dataset(path, a.num_requests, a.output_len)?,
            None => synthetic(a, vocab_size)?,
        };
        if requests.is_empty() {
            bail!("the workload has no requests");
        }
        let mut requests = requests;
        for (i, r) in requests.iter_mut().enumerate() {
            r.lora = a.lora.get(i % a.lora.len().max(1)).map(|path| LoRARequest {
                name: path.display().to_string(),
                id: (i % a.lora.len()) as u64,
                path: path.clone(),
            });
        }
        Ok(Self { requests })
    }
}

fn read_dataset(
    path: &PathBuf,
    limit: Option<usize>,
    default_out: usize,
) -> Result<Vec<BenchRequest>> {
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    let mut out = Vec::new();
    for (n, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        if limit.is_some_and(|l| out.len() >= l) {
            break;
        }
        let where_ = || format!("{}:{}", path.display(), n + 1);
        let l: Line = serde_json::from_str(line).with_context(where_)?;
        let input = match (l.input_ids, l.prompt) {
            (Some(ids), _) => Input::Ids(ids),
            (None, Some(p)) => Input::Text(p),
            (None, None) => bail!("{}: needs \"input_ids\" or \"prompt\"", where_()),
        };
        out.push(BenchRequest {
            input,
            output_tokens: l.output_tokens.or(l.max_tokens).unwrap_or(default_out),
            lora: None,
        });
    }
    Ok(out)
}

/// Random token ids away from the ends of the vocabulary, where tokenizers keep special
/// tokens; reproducible from the seed.
fn synthetic(a: &WorkloadArgs, vocab_size: usize) -> Result<Vec<BenchRequest>> {
    if a.input_len == 0 || a.output_len == 0 {
        bail!("--input-len and --output-len must be at least 1");
    }
    if vocab_size < 512 {
        bail!("vocabulary of {vocab_size} tokens is too small for synthetic prompts");
    }
    let mut rng = StdRng::seed_from_u64(a.seed);
    let (lo, hi) = (256, vocab_size as u32 - 256);
    Ok((0..a.num_requests.unwrap_or(32))
        .map(|_| BenchRequest {
            input: Input::Ids((0..a.input_len).map(|_| rng.random_range(lo..hi)).collect()),
            output_tokens: a.output_len,
            lora: None,
        })
        .collect())
}
