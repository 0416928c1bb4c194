//! The LLM API on SmolLM2 against transformers' golden outputs: text prompts batched through
//! `generate`, conversations through `chat`, and the sampling parameters (stop strings, n,
//! logprobs, penalties, min_tokens) with streamed deltas equal to the collected output.

use std::sync::OnceLock;

use anyhow::Result;
use trtllm_api::builder::BuildConfig;
use trtllm_api::{LlmArgs, Prompt, SamplingParams, StopReason, LLM};
use trtllm_tests::{fixtures, read_json, shared_engine, smollm2_gguf, SmolCase, SmolGolden};

fn llm() -> &'static LLM {
    static DIR: OnceLock<std::path::PathBuf> = OnceLock::new();
    static LLM: OnceLock<LLM> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let config = BuildConfig {
            max_seq_len: 1024,
            ..BuildConfig::default()
        };
        let gguf = smollm2_gguf().expect("demo model");
        shared_engine(env!("CARGO_TARGET_TMPDIR"), "api-smollm2", &gguf, &config)
            .expect("build SmolLM2 engine")
    });
    LLM.get_or_init(|| {
        LLM::new(LlmArgs {
            model: dir.clone(),
            ..Default::default()
        })
        .expect("open engine")
    })
}

fn golden() -> SmolGolden {
    read_json(&fixtures().join("smollm2-135m-instruct.json")).expect("golden file")
}

/// Greedy, the golden length, special tokens kept in the text (as the golden text was decoded,
/// but for the end-of-sequence token that ends a completion).
fn greedy_for(case: &SmolCase) -> SamplingParams {
    SamplingParams {
        max_tokens: case.greedy_ids.len(),
        skip_special_tokens: false,
        ..Default::default()
    }
}

#[test]
fn text_prompts_in_one_batch_and_chat_reproduce_the_golden_cases() -> Result<()> {
    let golden = golden();
    let llm = llm();
    let raw: Vec<&SmolCase> = golden.cases.iter().filter(|c| c.kind == "raw").collect();
    // One call, every prompt submitted together; each with its own golden length.
    let longest = raw.iter().map(|c| c.greedy_ids.len()).max().unwrap_or(1);
    let prompts: Vec<Prompt> = raw
        .iter()
        .map(|c| Prompt::Text(c.prompt.clone().unwrap_or_default()))
        .collect();
    let outs = llm.generate(
        &prompts,
        &SamplingParams {
            max_tokens: longest,
            skip_special_tokens: false,
            ..Default::default()
        },
    )?;
    for (case, out) in raw.iter().zip(&outs) {
        assert_eq!(out.prompt_token_ids, case.input_ids);
        let o = &out.outputs[0];
        // Cases that end in EOS stop there; the others ran on past the golden length.
        assert_eq!(&o.token_ids[..case.greedy_ids.len()], &case.greedy_ids[..]);
        if o.token_ids.len() == case.greedy_ids.len() {
            assert_eq!(o.text, case.completion_text());
        } else {
            assert!(o.text.starts_with(case.completion_text()));
        }
    }
    for case in golden.cases.iter().filter(|c| c.kind == "chat") {
        let messages = case.messages.as_ref().expect("chat case has messages");
        let out = llm.chat(messages, &greedy_for(case))?;
        assert_eq!(out.prompt_token_ids, case.input_ids);
        assert_eq!(out.outputs[0].token_ids, case.greedy_ids);
        assert_eq!(out.outputs[0].text, case.completion_text());
        assert_eq!(out.outputs[0].finish_reason.as_deref(), Some("stop"));
    }
    Ok(())
}

#[test]
fn stop_strings_cut_the_text_and_streams_equal_collected_output() -> Result<()> {
    let golden = golden();
    let llm = llm();
    for case in golden.cases.iter().filter(|c| c.kind == "raw") {
        let text = &case.greedy_text;
        // A stop string from the middle of the golden text, spanning token boundaries.
        let mid = text
            .char_indices()
            .nth(text.chars().count() / 2)
            .map_or(0, |x| x.0);
        let stop: String = text[mid..].chars().take(5).collect();
        let want = &text[..text.find(&stop).unwrap_or(0)];
        let params = SamplingParams {
            stop: vec![stop.clone()],
            ..greedy_for(case)
        };
        let mut stream = llm.generate_async(Prompt::TokenIds(case.input_ids.clone()), &params)?;
        let mut streamed = String::new();
        while let Some(delta) = stream.next_delta() {
            let delta = delta?;
            assert!(!delta.text.contains('\u{fffd}'), "broken UTF-8 streamed");
            streamed.push_str(&delta.text);
        }
        let out = stream.output();
        let o = &out.outputs[0];
        assert_eq!(o.text, want, "stop {stop:?}");
        assert_eq!(streamed, o.text);
        assert_eq!(o.finish_reason.as_deref(), Some("stop"));
        assert_eq!(o.stop_reason, Some(StopReason::Text(stop)));
        // The output's tokens end where the stop string was completed.
        assert!(case.greedy_ids.starts_with(&o.token_ids));
    }
    Ok(())
}

#[test]
fn logprobs_follow_the_golden_logits() -> Result<()> {
    let golden = golden();
    for case in &golden.cases {
        let params = SamplingParams {
            max_tokens: 3,
            logprobs: Some(5),
            ..Default::default()
        };
        let out = llm().generate(&[Prompt::TokenIds(case.input_ids.clone())], &params)?;
        let o = &out[0].outputs[0];
        let lps = o.logprobs.as_ref().expect("logprobs asked for");
        assert_eq!(lps.len(), o.token_ids.len());
        let sum: f64 = lps.iter().map(|l| l.logprob as f64).sum();
        assert!((o.cumulative_logprob.unwrap() - sum).abs() < 1e-9);
        // At the first step, log-probability differences are logit differences; the golden
        // top-10 logits at the last prompt position give them (within float noise).
        let first = &lps[0];
        assert_eq!(first.token_id, case.greedy_ids[0]);
        assert_eq!(first.top[0].token_id, first.token_id);
        assert_eq!(first.top.len(), 5);
        for (t, (gid, glogit)) in first.top.iter().zip(&case.last_prompt_top10) {
            assert_eq!(t.token_id, *gid);
            let d = (t.logprob - first.logprob) - (glogit - case.last_prompt_top10[0].1);
            assert!(d.abs() < 5e-3, "token {gid}: off by {d}");
        }
    }
    Ok(())
}

#[test]
fn n_completions_seeded_sampling_penalties_and_min_tokens() -> Result<()> {
    let llm = llm();
    let prompt = || Prompt::Text("Once upon a time, in a small village,".into());
    let sampled = SamplingParams {
        max_tokens: 24,
        temperature: 1.0,
        top_p: 0.95,
        min_p: 0.05,
        seed: Some(11),
        n: 3,
        ..Default::default()
    };
    let a = llm.generate(&[prompt()], &sampled)?.remove(0);
    let b = llm.generate(&[prompt()], &sampled)?.remove(0);
    assert_eq!(a.outputs.len(), 3);
    assert_eq!(a.outputs, b.outputs, "a seeded request is reproducible");
    assert_ne!(
        a.outputs[0].token_ids, a.outputs[1].token_ids,
        "completions get their own seeds"
    );

    // A frequency penalty breaks greedy repetition: fewer repeated tokens than plain greedy.
    let repeats =
        |ids: &[u32]| ids.len() - ids.iter().collect::<std::collections::HashSet<_>>().len();
    let greedy = SamplingParams {
        max_tokens: 48,
        ignore_eos: true,
        ..Default::default()
    };
    let plain = &llm.generate(&[prompt()], &greedy)?[0].outputs[0];
    let penalised = &llm.generate(
        &[prompt()],
        &SamplingParams {
            frequency_penalty: 1.5,
            repetition_penalty: 1.3,
            ..greedy.clone()
        },
    )?[0]
        .outputs[0];
    assert!(
        repeats(&penalised.token_ids) < repeats(&plain.token_ids),
        "{} vs {}",
        penalised.text,
        plain.text
    );

    // The short golden chat case ends with EOS after 8 tokens; min_tokens keeps it going.
    let golden = golden();
    let case = golden
        .cases
        .iter()
        .find(|c| c.kind == "chat" && c.greedy_ids.len() == 8)
        .expect("short chat case");
    let out = llm.chat(
        case.messages.as_ref().expect("messages"),
        &SamplingParams {
            max_tokens: 20,
            min_tokens: 12,
            ..Default::default()
        },
    )?;
    let ids = &out.outputs[0].token_ids;
    assert!(ids.len() >= 12, "{ids:?}");
    assert!(!ids[..12].contains(&2), "EOS before min_tokens: {ids:?}");
    assert_eq!(&ids[..7], &case.greedy_ids[..7]);
    Ok(())
}
