//! Speculative decoding, by prompt lookup (n-gram drafts) and by a draft model: greedy outputs
//! equal transformers' golden tokens on SmolLM2 (float32 target; draft: the same GGUF with its
//! Q4_1 weights kept) alone and in a batch of 16; sampled outputs equal plain decoding's seed for
//! seed, and unseeded their distribution is plain decoding's (chi-square).

use std::collections::BTreeMap;

use anyhow::{ensure, Result};
use statrs::distribution::{ChiSquared, ContinuousCDF};
use trtllm_api::builder::{build, BuildConfig};
use trtllm_api::executor::{ExecutorConfig, SpeculativeConfig, SpeculativeTotals};
use trtllm_api::{ChatOptions, LlmArgs, Prompt, SamplingParams, LLM};
use trtllm_tests::{fixtures, read_json, shared_engine, smollm2_gguf, SmolGolden};

fn ngram(max_draft_len: usize) -> ExecutorConfig {
    ExecutorConfig {
        speculative: Some(SpeculativeConfig::NGram {
            max_draft_len,
            max_matching_ngram_size: 3,
        }),
        ..Default::default()
    }
}

fn draft_model(max_draft_len: usize, dir: &std::path::Path) -> ExecutorConfig {
    ExecutorConfig {
        speculative: Some(SpeculativeConfig::DraftTarget {
            max_draft_len,
            speculative_model: dir.into(),
        }),
        ..Default::default()
    }
}

fn open(engine: &std::path::Path, executor_config: ExecutorConfig) -> Result<LLM> {
    Ok(LLM::new(LlmArgs {
        model: engine.into(),
        executor_config,
        ..Default::default()
    })?)
}

fn totals(llm: &LLM) -> Result<SpeculativeTotals> {
    let load = llm.executor().load(std::time::Duration::from_secs(10))?;
    ensure!(
        load.kv.used_blocks == 0,
        "blocks left in use: {:?}",
        load.kv
    );
    Ok(load.speculative)
}

#[test]
fn smollm2_greedy_equals_the_golden_tokens_alone_and_in_a_batch_of_16() -> Result<()> {
    let root = env!("CARGO_TARGET_TMPDIR");
    let gguf = smollm2_gguf()?;
    let engine = shared_engine(root, "smollm2-speculative", &gguf, &BuildConfig::default())?;
    let keep = BuildConfig {
        keep_quantized: true,
        ..Default::default()
    };
    let draft = shared_engine(root, "smollm2-speculative-draft", &gguf, &keep)?;
    greedy_golden(&engine, ngram(4))?;
    greedy_golden(&engine, draft_model(4, &draft))
}

fn greedy_golden(engine: &std::path::Path, cfg: ExecutorConfig) -> Result<()> {
    let golden: SmolGolden = read_json(&fixtures().join("smollm2-135m-instruct.json"))?;
    let llm = open(engine, cfg)?;
    let mut cases = Vec::new();
    for case in &golden.cases {
        let ids = match &case.messages {
            Some(m) => llm.chat_prompt(m, &ChatOptions::default())?,
            None => case.input_ids.clone(),
        };
        ensure!(ids == case.input_ids, "input ids");
        let params = SamplingParams {
            max_tokens: case.greedy_ids.len(),
            ..Default::default()
        };
        cases.push((Prompt::TokenIds(ids), params, &case.greedy_ids));
    }
    for (i, (prompt, params, gold)) in cases.iter().enumerate() {
        let out = llm.generate(std::slice::from_ref(prompt), params)?;
        ensure!(&out[0].outputs[0].token_ids == *gold, "case {i} alone");
    }
    let alone = totals(&llm)?;
    // 16 at once, through the async API so each keeps its own max_tokens.
    let streams: Vec<_> = (0..16)
        .map(|j| {
            let (prompt, params, _) = &cases[j % cases.len()];
            llm.generate_async(prompt.clone(), params)
        })
        .collect::<std::result::Result<_, _>>()?;
    for (j, s) in streams.into_iter().enumerate() {
        let out = s.collect()?;
        ensure!(
            &out.outputs[0].token_ids == cases[j % cases.len()].2,
            "request {j} in the batch of 16"
        );
    }
    let all = totals(&llm)?;
    eprintln!("alone: {alone:?}; after the batch: {all:?}");
    // Drafts were made and kept, alone and in the batch (the Q4_1 draft agrees with the float
    // target on every golden token; rejections are covered by the sampling tests).
    ensure!(alone.accepted_draft_tokens > 0 && all.drafts > alone.drafts);
    Ok(())
}

/// tiny-llama built with the default config into a temporary directory.
fn tiny_llama() -> Result<tempfile::TempDir> {
    let engine = tempfile::tempdir()?;
    build(
        &fixtures().join("tiny-llama"),
        engine.path(),
        &BuildConfig::default(),
        &mut |_, _, _| {},
    )?;
    Ok(engine)
}

/// tiny-llama and a prompt that makes prompt lookup draft well: a seed, the model's own greedy
/// continuation of it, and the seed again.
fn tiny() -> Result<(tempfile::TempDir, Vec<u32>)> {
    let engine = tiny_llama()?;
    let seed: Vec<u32> = vec![5, 17, 29, 3, 11];
    let plain = open(engine.path(), ExecutorConfig::default())?;
    let greedy = SamplingParams {
        max_tokens: 8,
        ignore_eos: true,
        ..Default::default()
    };
    let cont = plain.generate(&[Prompt::TokenIds(seed.clone())], &greedy)?;
    let mut prompt = seed.clone();
    prompt.extend(&cont[0].outputs[0].token_ids);
    prompt.extend(&seed);
    Ok((engine, prompt))
}

fn sampled(seed: Option<u64>, max_tokens: usize) -> SamplingParams {
    SamplingParams {
        max_tokens,
        ignore_eos: true,
        temperature: 1.0,
        top_k: 3,
        seed,
        ..Default::default()
    }
}

#[test]
fn seeded_sampling_gives_plain_decodings_tokens() -> Result<()> {
    let (engine, prompt) = tiny()?;
    seeded(engine.path(), &prompt, ngram(3))?;
    // The target as its own draft: its greedy proposals are kept only where sampling agrees.
    seeded(engine.path(), &prompt, draft_model(3, engine.path()))
}

fn seeded(engine: &std::path::Path, prompt: &[u32], cfg: ExecutorConfig) -> Result<()> {
    let plain = open(engine, ExecutorConfig::default())?;
    let spec = open(engine, cfg)?;
    let prompts = vec![Prompt::TokenIds(prompt.to_vec()); 1];
    for seed in 0..200 {
        let params = sampled(Some(seed), 10);
        let a = plain.generate(&prompts, &params)?;
        let b = spec.generate(&prompts, &params)?;
        ensure!(
            a[0].outputs[0].token_ids == b[0].outputs[0].token_ids,
            "seed {seed}"
        );
    }
    let t = totals(&spec)?;
    eprintln!("{t:?}");
    ensure!(t.accepted_draft_tokens > 0 && t.accepted_draft_tokens < t.draft_tokens);
    Ok(())
}

/// The p-value of a chi-square test that two equal-sized samples come from one distribution
/// (categories with fewer than 10 in both together pooled).
fn homogeneity_p(x: &PairCounts, y: &PairCounts) -> Result<f64> {
    let mut cells: Vec<(usize, usize)> = Vec::new();
    let mut rest = (0, 0);
    let keys: std::collections::BTreeSet<_> = x.keys().chain(y.keys()).collect();
    for k in keys {
        let (a, b) = (
            x.get(k).copied().unwrap_or(0),
            y.get(k).copied().unwrap_or(0),
        );
        if a + b >= 10 {
            cells.push((a, b));
        } else {
            rest = (rest.0 + a, rest.1 + b);
        }
    }
    if rest.0 + rest.1 > 0 {
        cells.push(rest);
    }
    ensure!(cells.len() > 2, "too few categories: {cells:?}");
    let stat: f64 = cells
        .iter()
        .map(|&(a, b)| {
            // Equal sample sizes: each expected count is half the cell's total.
            let e = (a + b) as f64 / 2.0;
            ((a as f64 - e).powi(2) + (b as f64 - e).powi(2)) / e
        })
        .sum();
    let p = ChiSquared::new((cells.len() - 1) as f64)?.sf(stat);
    eprintln!(
        "{} categories, chi-square {stat:.1}, p = {p:.3}",
        cells.len()
    );
    Ok(p)
}

/// How often each pair of tokens was sampled.
type PairCounts = BTreeMap<(u32, u32), usize>;

/// Unseeded, 20,000 samples each way (plain, n-gram, the target as its own draft model) of 6
/// tokens, compared by a chi-square test of homogeneity
/// over the last two tokens (by then the output repeats itself and drafts are kept often).
#[test]
fn sampled_distribution_is_plain_decodings() -> Result<()> {
    let (engine, prompt) = tiny()?;
    const N: usize = 20_000;
    let count = |cfg: ExecutorConfig| -> Result<(PairCounts, SpeculativeTotals)> {
        let llm = open(engine.path(), cfg)?;
        let prompts = vec![Prompt::TokenIds(prompt.clone()); N];
        let mut counts = BTreeMap::new();
        for out in llm.generate(&prompts, &sampled(None, 6))? {
            let t = &out.outputs[0].token_ids;
            *counts.entry((t[4], t[5])).or_insert(0) += 1;
        }
        Ok((counts, totals(&llm)?))
    };
    let (plain, _) = count(ExecutorConfig::default())?;
    for cfg in [ngram(2), draft_model(2, engine.path())] {
        let (spec, t) = count(cfg)?;
        eprintln!("{t:?}");
        ensure!(
            t.accepted_draft_tokens > 1000 && t.accepted_draft_tokens < t.draft_tokens,
            "too few drafts kept or rejected to test: {t:?}"
        );
        let p = homogeneity_p(&plain, &spec)?;
        ensure!(
            p > 0.01,
            "speculative and plain distributions differ: p = {p}"
        );
    }
    Ok(())
}

#[test]
fn a_draft_model_with_another_vocabulary_is_refused() -> Result<()> {
    let target = tiny_llama()?;
    // Another vocabulary size: SmolLM2's 49,152 tokens against 1,024.
    let smol = tempfile::tempdir()?;
    let keep = BuildConfig {
        keep_quantized: true,
        ..Default::default()
    };
    build(&smollm2_gguf()?, smol.path(), &keep, &mut |_, _, _| {})?;
    let refused = |draft: &std::path::Path| match open(target.path(), draft_model(3, draft)) {
        Ok(_) => Err(anyhow::anyhow!(
            "{} was accepted as a draft",
            draft.display()
        )),
        Err(e) => Ok(e.to_string()),
    };
    let err = refused(smol.path())?;
    ensure!(err.contains("vocabulary"), "{err}");
    // The same size with two tokens swapped: ids that mean other text.
    let swapped = tiny_llama()?;
    let path = swapped.path().join("tokenizer.json");
    let mut tok: serde_json::Value = read_json(&path)?;
    let vocab = tok["model"]["vocab"]
        .as_object_mut()
        .expect("a BPE vocabulary");
    let ids: Vec<String> = vocab
        .iter()
        .filter(|(_, id)| matches!(id.as_u64(), Some(300 | 301)))
        .map(|(t, _)| t.clone())
        .collect();
    ensure!(
        ids.len() == 2,
        "tokens 300 and 301 in tiny-llama's vocabulary"
    );
    let (v0, v1) = (vocab[&ids[0]].clone(), vocab[&ids[1]].clone());
    vocab.insert(ids[0].clone(), v1);
    vocab.insert(ids[1].clone(), v0);
    std::fs::write(&path, serde_json::to_string(&tok)?)?;
    let err = refused(swapped.path())?;
    ensure!(err.contains("token 300"), "{err}");
    Ok(())
}
