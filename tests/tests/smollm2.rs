//! SmolLM2-135M-Instruct from its Q4_1 GGUF against transformers' golden outputs. Needs the model
//! from `cargo xtask fetch-demo-model`; fails with that instruction when it is missing.

use std::sync::OnceLock;

use anyhow::Result;
use trtllm_api::builder::BuildConfig;
use trtllm_api::{ChatOptions, LlmArgs, Prompt, SamplingParams, LLM};
use trtllm_tests::{fixtures, read_json, shared_engine, smollm2_gguf, SmolGolden};

/// One engine for the whole file: building takes seconds, not worth repeating per test.
fn engine_dir() -> &'static std::path::Path {
    static DIR: OnceLock<std::path::PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let gguf = smollm2_gguf().expect("demo model");
        let config = BuildConfig::default();
        shared_engine(env!("CARGO_TARGET_TMPDIR"), "smollm2", &gguf, &config)
            .expect("build SmolLM2 engine")
    })
}

fn golden() -> Result<SmolGolden> {
    read_json(&fixtures().join("smollm2-135m-instruct.json"))
}

fn llm() -> Result<LLM> {
    Ok(LLM::new(LlmArgs {
        model: engine_dir().into(),
        ..Default::default()
    })?)
}

#[test]
fn golden_cases_greedy_ids_exact() -> Result<()> {
    let golden = golden()?;
    let llm = llm()?;
    for (i, case) in golden.cases.iter().enumerate() {
        let ids = match case.kind.as_str() {
            "chat" => {
                let messages = case.messages.as_ref().expect("chat case has messages");
                let tok = llm.tokenizer()?;
                let templated = tok.apply_chat_template(messages, &ChatOptions::default())?;
                assert_eq!(
                    Some(&templated),
                    case.templated.as_ref(),
                    "case {i}: chat template"
                );
                llm.chat_prompt(messages, &ChatOptions::default())?
            }
            _ => llm.encode_prompt(&Prompt::Text(
                case.prompt.clone().expect("raw case has a prompt"),
            ))?,
        };
        assert_eq!(ids, case.input_ids, "case {i}: input ids");
        let params = SamplingParams {
            max_tokens: case.greedy_ids.len(),
            ..Default::default()
        };
        let out = llm.generate(&[Prompt::TokenIds(ids)], &params)?;
        let o = &out[0].outputs[0];
        assert_eq!(o.token_ids, case.greedy_ids, "case {i}: greedy ids");
        // The golden text was decoded with special tokens kept.
        let text = llm.tokenizer()?.decode(&o.token_ids, false)?;
        assert_eq!(text, case.greedy_text, "case {i}: text");
        let stopped = case.greedy_ids.last() == Some(&2);
        assert_eq!(
            o.finish_reason.as_deref(),
            Some(if stopped { "stop" } else { "length" }),
            "case {i}"
        );
    }
    Ok(())
}

#[test]
fn last_prompt_top10_logits() -> Result<()> {
    use trtllm_api::runtime::{LogitsMode, Session};
    let golden = golden()?;
    let session = Session::open(engine_dir())?;
    let runner = session.model_runner()?;
    for (i, case) in golden.cases.iter().enumerate() {
        let mut cache = runner.new_cache(case.input_ids.len())?;
        let logits = runner.forward(&case.input_ids, &mut cache, LogitsMode::Last)?;
        for &(id, gold) in &case.last_prompt_top10 {
            let d = (logits[id as usize] - gold).abs();
            assert!(
                d < 2e-3,
                "case {i} token {id}: {} vs {gold}",
                logits[id as usize]
            );
        }
    }
    Ok(())
}

#[test]
fn tokenizer_matches_perplexity_ids() -> Result<()> {
    // The golden perplexity ids are the first 1024 tokens of the Apache-2.0 license text.
    let golden = golden()?;
    let text = std::fs::read_to_string(fixtures().join("apache-2.0.txt"))?;
    let ids = llm()?.tokenizer()?.encode(&text, false)?;
    assert_eq!(&ids[..1024], &golden.perplexity.input_ids[..]);
    Ok(())
}

#[test]
fn perplexity_within_two_permille() -> Result<()> {
    let golden = golden()?;
    let p = llm()?.perplexity(&golden.perplexity.input_ids)?;
    let rel = (p.mean_nll - golden.perplexity.mean_nll).abs() / golden.perplexity.mean_nll;
    assert_eq!(p.tokens, 1023);
    assert!(
        rel < 2e-3,
        "mean NLL {} vs golden {} (relative {rel})",
        p.mean_nll,
        golden.perplexity.mean_nll
    );
    Ok(())
}

/// Prompt log-probabilities come from the same logits transformers scored: their mean NLL over
/// the golden 1,024 tokens is the golden perplexity's, computed in prefill chunks (the
/// executor's default and 256-token chunks give the same numbers), with top alternatives
/// sorted and holding the most likely token.
#[test]
fn prompt_logprobs_give_the_golden_perplexity() -> Result<()> {
    let golden = golden()?;
    let ids = &golden.perplexity.input_ids;
    let params = SamplingParams {
        max_tokens: 1,
        prompt_logprobs: Some(3),
        ..Default::default()
    };
    let mean_nll = |lps: &[trtllm_api::Logprob]| {
        -lps.iter().map(|l| l.logprob as f64).sum::<f64>() / lps.len() as f64
    };
    let whole = llm()?.generate(&[Prompt::TokenIds(ids.clone())], &params)?;
    let lps = whole[0].prompt_logprobs.clone().expect("prompt logprobs");
    assert_eq!(lps.len(), ids.len() - 1);
    assert!(lps.iter().zip(&ids[1..]).all(|(l, &id)| l.token_id == id));
    assert!(lps.iter().all(|l| l.top.len() == 3
        && l.top.windows(2).all(|w| w[0].logprob >= w[1].logprob)
        && l.top[0].logprob >= l.logprob));
    let rel = (mean_nll(&lps) - golden.perplexity.mean_nll).abs() / golden.perplexity.mean_nll;
    assert!(
        rel < 2e-3,
        "mean NLL {} vs golden {}",
        mean_nll(&lps),
        golden.perplexity.mean_nll
    );

    let mut executor_config = trtllm_api::executor::ExecutorConfig::default();
    executor_config.scheduler.max_num_tokens = Some(256);
    let chunked = LLM::new(LlmArgs {
        model: engine_dir().into(),
        executor_config,
        ..Default::default()
    })?;
    let out = chunked.generate(&[Prompt::TokenIds(ids.clone())], &params)?;
    let again = out[0].prompt_logprobs.clone().expect("prompt logprobs");
    assert_eq!(again.len(), lps.len());
    for (a, b) in again.iter().zip(&lps) {
        assert!((a.logprob - b.logprob).abs() < 1e-3, "{a:?} vs {b:?}");
    }
    Ok(())
}
