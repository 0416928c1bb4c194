//! Batch invariance (`ExecutorConfig::batch_invariant`): one request's prompt and generation
//! logits are bit for bit those it gets alone, whatever runs beside it (0 to 31 other requests
//! of other lengths, submitted before and after it) and however the step's token budget chunks
//! its prompt (13, 64 or 2048 tokens per step), over float32 and kept-Q4_1 SmolLM2 engines.

use anyhow::Result;
use trtllm_api::builder::BuildConfig;
use trtllm_api::runtime::Device;
use trtllm_tests::invariance::Mix;
use trtllm_tests::{fixtures, invariance, read_json, shared_engine, smollm2_gguf, SmolGolden};

fn check(name: &str, config: &BuildConfig) -> Result<()> {
    let engine = shared_engine(env!("CARGO_TARGET_TMPDIR"), name, &smollm2_gguf()?, config)?;
    let golden: SmolGolden = read_json(&fixtures().join("smollm2-135m-instruct.json"))?;
    let mixes =
        [(0, 13), (3, 64), (12, 2048), (31, 64), (31, 13)].map(|(others, max_num_tokens)| Mix {
            others,
            max_num_tokens,
        });
    invariance::check(
        name,
        (&engine, Device::Cpu),
        &golden.perplexity.input_ids,
        &mixes,
    )
}

#[test]
fn float32_logits_do_not_depend_on_the_batch() -> Result<()> {
    let config = BuildConfig {
        max_batch_size: 64,
        ..Default::default()
    };
    check("invariance-f32", &config)
}

#[test]
fn quantized_logits_do_not_depend_on_the_batch() -> Result<()> {
    let config = BuildConfig {
        max_batch_size: 64,
        keep_quantized: true,
        ..Default::default()
    };
    check("invariance-q4_1", &config)
}
