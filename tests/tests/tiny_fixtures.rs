//! Every tiny fixture against transformers' golden outputs: tokenizer ids, prompt logits,
//! greedy ids and the logits of the first decode steps (the KV-cache path).

use anyhow::Result;
use trtllm_api::builder::{build, BuildConfig};
use trtllm_api::runtime::{quant::DType, Device, KvBudget, LogitsMode, SeqChunk, Session};
use trtllm_api::{LlmArgs, Prompt, SamplingParams, LLM};
use trtllm_tests::{
    check_tiny_fixture, check_windowed_blocks, fixtures, max_abs_diff, read_json, FixtureGolden,
    TINY_FIXTURES,
};

const TOL: f32 = 1e-3;

fn check_fixture(name: &str) -> Result<()> {
    check_tiny_fixture(name).map(drop)
}

#[test]
fn tiny_llama_bf16_gqa() -> Result<()> {
    check_fixture("tiny-llama")
}

#[test]
fn tiny_qwen2_qkv_bias_tied() -> Result<()> {
    check_fixture("tiny-qwen2")
}

#[test]
fn tiny_mistral_f16_explicit_head_dim() -> Result<()> {
    check_fixture("tiny-mistral")
}

#[test]
fn tiny_gpt2_layernorm_learned_positions_conv1d() -> Result<()> {
    check_fixture("tiny-gpt2")
}

#[test]
fn tiny_qwen3_qk_norm_head_dim_wider_than_hidden() -> Result<()> {
    check_fixture("tiny-qwen3")
}

/// Window 8 on every layer; each case's prompt plus its 16 generated tokens crosses it, in
/// prefill (the tile path) and decode (the row path).
#[test]
fn tiny_mistral_sliding_window() -> Result<()> {
    check_fixture("tiny-mistral-swa")
}

#[test]
fn tiny_phi3_fused_qkv_and_gate_up_in_the_checkpoint() -> Result<()> {
    check_fixture("tiny-phi3")
}

/// (1 + w) norms, post-norms, GeGLU, √hidden embeddings, attention and final soft-capping,
/// query_pre_attn_scalar, window 6 on alternate layers.
#[test]
fn tiny_gemma2() -> Result<()> {
    check_fixture("tiny-gemma2")
}

/// 4 experts, top-2 routing renormalized.
#[test]
fn tiny_mixtral_sparse_moe() -> Result<()> {
    check_fixture("tiny-mixtral")
}

/// Converting storage type at build time is exact when widening (bf16 → f32) and stays close
/// when narrowing (f32 → bf16).
/// Experts of their own size in layers 0 and 2, a dense MLP in layer 1 (mlp_only_layers), top-2
/// weights not renormalized.
#[test]
fn tiny_llama_multi_query_attention() -> Result<()> {
    check_fixture("tiny-llama-mqa")
}

#[test]
fn tiny_qwen3_moe_sparse_and_dense_layers() -> Result<()> {
    check_fixture("tiny-qwen3-moe")
}

/// Local and global layers with their own RoPE bases (the global one scaled), (1 + w) q/k norms.
#[test]
fn tiny_gemma3_local_global_rope_and_qk_norms() -> Result<()> {
    check_fixture("tiny-gemma3")
}

/// Every prompt grows past max_position_embeddings (12) while it generates: the base changes at
/// each step, and keys keep the rotation of the step that computed them.
#[test]
fn tiny_llama_dynamic_ntk_rope() -> Result<()> {
    check_fixture("tiny-llama-dynamic")
}

#[test]
fn tiny_qwen3_yarn_rope() -> Result<()> {
    check_fixture("tiny-qwen3-yarn")
}

/// Short factors until a sequence passes 12 tokens, long ones after; partial rotary 0.75.
#[test]
fn tiny_phi3_longrope_partial_rotary() -> Result<()> {
    check_fixture("tiny-phi3-longrope")
}

#[test]
fn tiny_llama_llama3_rope_scaling() -> Result<()> {
    check_fixture("tiny-llama-rope-scaled")
}

#[test]
fn tiny_qwen2_linear_rope_scaling() -> Result<()> {
    check_fixture("tiny-qwen2-linear")
}

#[test]
fn dtype_conversion_at_build_time() -> Result<()> {
    for (name, dtype, tol) in [
        ("tiny-llama", DType::F32, TOL),
        ("tiny-qwen2", DType::BF16, 0.15),
    ] {
        let dir = fixtures().join(name);
        let golden: FixtureGolden = read_json(&dir.join("golden.json"))?;
        let out = tempfile::tempdir()?;
        let config = BuildConfig {
            dtype: Some(dtype),
            ..Default::default()
        };
        build(&dir, out.path(), &config, &mut |_, _, _| {})?;
        let session = Session::open(out.path())?;
        assert!(session.tensors().iter().any(|t| t.dtype == dtype));
        let runner = session.model_runner()?;
        let case = &golden.cases[0];
        let mut cache = runner.new_cache(64)?;
        let logits = runner.forward(&case.input_ids, &mut cache, LogitsMode::Last)?;
        let d = max_abs_diff(&logits, case.prompt_logits.last().expect("logits"));
        assert!(d < tol, "{name} as {dtype}: max |Δlogit| = {d}");
    }
    Ok(())
}

#[test]
fn all_fixtures_listed() {
    for name in TINY_FIXTURES {
        assert!(fixtures().join(name).join("golden.json").exists(), "{name}");
    }
}

/// 32 sequences decoding together (each step's tokens grouped by expert, every expert's weights
/// read once for all of them) give the tokens each gives alone.
#[test]
fn tiny_mixtral_batch_of_32_equals_each_alone() -> Result<()> {
    let dir = fixtures().join("tiny-mixtral");
    let golden: FixtureGolden = read_json(&dir.join("golden.json"))?;
    let out = tempfile::tempdir()?;
    let cfg = BuildConfig {
        max_batch_size: 32,
        ..Default::default()
    };
    build(&dir, out.path(), &cfg, &mut |_, _, _| {})?;
    let llm = LLM::new(LlmArgs {
        model: out.path().into(),
        ..Default::default()
    })?;
    // Prompts of 2 to 8 tokens cut from the golden prompts at different offsets.
    let ids: Vec<u32> = golden
        .cases
        .iter()
        .flat_map(|c| c.input_ids.clone())
        .collect();
    let prompts: Vec<Prompt> = (0..32)
        .map(|i| {
            Prompt::TokenIds(
                (0..2 + i % 7)
                    .map(|j| ids[(3 * i + j) % ids.len()])
                    .collect(),
            )
        })
        .collect();
    let params = SamplingParams {
        max_tokens: 12,
        ignore_eos: true,
        ..Default::default()
    };
    let together = llm.generate(&prompts, &params)?;
    for (i, (p, t)) in prompts.iter().zip(&together).enumerate() {
        let alone = llm.generate(std::slice::from_ref(p), &params)?;
        assert_eq!(
            t.outputs[0].token_ids, alone[0].outputs[0].token_ids,
            "prompt {i}: batched tokens differ from alone"
        );
    }
    Ok(())
}

/// With dynamic NTK a key's rotation depends on its sequence's length, so a long prompt never
/// takes the cached blocks of a short one with the same start: it gives what it gives alone.
#[test]
fn tiny_llama_dynamic_never_shares_prefix_blocks() -> Result<()> {
    let dir = fixtures().join("tiny-llama-dynamic");
    let golden: FixtureGolden = read_json(&dir.join("golden.json"))?;
    let out = tempfile::tempdir()?;
    build(&dir, out.path(), &BuildConfig::default(), &mut |_, _, _| {})?;
    let llm = || {
        let mut args = LlmArgs {
            model: out.path().into(),
            ..Default::default()
        };
        args.executor_config.kv_cache.tokens_per_block = 4;
        LLM::new(args)
    };
    // The short prompt is within max_position_embeddings (12); the long one starts alike and is
    // past it.
    let short = golden.cases[2].input_ids.clone();
    let long: Vec<u32> = golden.cases[..3]
        .iter()
        .rev()
        .flat_map(|c| c.input_ids.clone())
        .collect();
    assert!(short.len() >= 8 && short.len() <= 12 && long.len() > 12);
    let params = SamplingParams {
        max_tokens: 8,
        ignore_eos: true,
        logprobs: Some(0),
        ..Default::default()
    };
    let run = |llm: &LLM, p: &[u32]| -> Result<(Vec<u32>, Option<f64>)> {
        let o = llm.generate(&[Prompt::TokenIds(p.to_vec())], &params)?;
        let c = &o[0].outputs[0];
        Ok((c.token_ids.clone(), c.cumulative_logprob))
    };
    let alone = run(&llm()?, &long)?;
    let shared = llm()?;
    run(&shared, &short)?;
    assert_eq!(run(&shared, &long)?, alone);
    Ok(())
}

/// Gemma 2's windowed layers (window 6) hand back the blocks their window has passed.
#[test]
fn tiny_gemma2_windowed_layers_hold_only_their_window() -> Result<()> {
    check_windowed_blocks(Device::Cpu)
}

/// A hand-made block table naming a block the pool lacks is an error, not a panic in the KV write.
#[test]
fn a_block_table_naming_a_missing_block_is_an_error() -> Result<()> {
    let dir = fixtures().join("tiny-llama");
    let out = tempfile::tempdir()?;
    build(&dir, out.path(), &BuildConfig::default(), &mut |_, _, _| {})?;
    let session = Session::open(out.path())?;
    let runner = session.model_runner()?;
    let mut pool = runner.new_pool(&KvBudget::single(4, 16))?;
    let table: &[u32] = &[99];
    let chunk = SeqChunk {
        tokens: &[5, 6, 7],
        past: 0,
        blocks: &[table],
        logits: LogitsMode::Last,
        lora: None,
    };
    let e = runner.forward_batch(&[chunk], &mut pool).unwrap_err();
    assert!(e.to_string().contains("block 99"), "{e}");
    Ok(())
}
