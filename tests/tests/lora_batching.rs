//! LoRA requests in flight together (issue 20): 32 concurrent requests over four adapters of one
//! base and the base itself each get the tokens they get alone, on an engine that holds only two
//! adapters on the device and three on the host (so the scheduler holds requests back, and
//! adapters are dropped and read again); the prefix cache never hands one adapter's blocks to
//! another; a bad adapter fails its request alone.

use std::path::Path;

use anyhow::{ensure, Result};
use trtllm_api::builder::{build, BuildConfig};
use trtllm_api::executor::{GenerationExecutor, GenerationRequest, LoraRequest};
use trtllm_api::runtime::GenerationParams;
use trtllm_tests::fixtures;

const ADAPTERS: [&str; 4] = [
    "tiny-llama-r8",
    "tiny-llama-r4-qv-rslora",
    "tiny-llama-r16-mlp",
    "tiny-llama-r2-ko",
];

fn lora(i: usize) -> Option<LoraRequest> {
    ADAPTERS.get(i).map(|name| LoraRequest {
        name: name.to_string(),
        id: 10 + i as u64,
        path: fixtures().join("lora").join(name),
    })
}

fn request(prompt: Vec<u32>, lora: Option<LoraRequest>) -> GenerationRequest {
    GenerationRequest {
        prompt_token_ids: prompt,
        params: GenerationParams {
            max_new_tokens: 8,
            ignore_eos: true,
            ..Default::default()
        },
        client_id: None,
        lora,
    }
}

/// A 70-token shared prefix (two full KV blocks of 32), then a suffix of its own.
fn prompt(i: usize) -> Vec<u32> {
    (0..70u32)
        .map(|t| 30 + t * 7)
        .chain((0..3 + i as u32 % 5).map(|t| 200 + 13 * i as u32 + t))
        .collect()
}

fn engine() -> Result<tempfile::TempDir> {
    let out = tempfile::tempdir()?;
    let config = BuildConfig {
        max_batch_size: 32,
        max_loras: 2,
        max_cpu_loras: 3,
        ..Default::default()
    };
    build(
        &fixtures().join("tiny-llama"),
        out.path(),
        &config,
        &mut |_, _, _| {},
    )?;
    Ok(out)
}

#[test]
fn thirty_two_requests_over_four_adapters_and_the_base_match_their_alone_outputs() -> Result<()> {
    let dir = engine()?;
    let exec = GenerationExecutor::new(dir.path())?;
    // Request i runs adapter i % 5 (4: the base).
    let alone: Vec<Vec<u32>> = (0..32)
        .map(|i| Ok(exec.submit(request(prompt(i), lora(i % 5)))?.wait()?.tokens))
        .collect::<Result<_>>()?;
    let handles: Vec<_> = (0..32)
        .map(|i| exec.submit(request(prompt(i), lora(i % 5))))
        .collect::<Result<_, _>>()?;
    for (i, h) in handles.into_iter().enumerate() {
        let got = h.wait()?.tokens;
        ensure!(
            got == alone[i],
            "request {i} (adapter {:?}): {got:?} alone {:?}",
            lora(i % 5).map(|l| l.name),
            alone[i]
        );
    }
    // Different adapters give different continuations of the same prompt.
    let firsts: Vec<_> = (0..5).map(|a| &alone[a]).collect();
    ensure!(firsts.windows(2).all(|w| w[0] != w[1]), "{firsts:?}");
    ensure!(exec.kv_cache_summary()?.used_blocks == 0);
    Ok(())
}

#[test]
fn cached_prefixes_are_never_shared_across_adapters() -> Result<()> {
    let dir = engine()?;
    let exec = GenerationExecutor::new(dir.path())?;
    let reused = |l: Option<LoraRequest>| -> Result<usize> {
        let (_, stats) = exec.submit(request(prompt(0), l))?.wait_with_stats()?;
        Ok(stats.reused_tokens)
    };
    ensure!(reused(lora(0))? == 0, "first run");
    ensure!(
        reused(lora(1))? == 0,
        "another adapter reused adapter 0's blocks"
    );
    ensure!(reused(None)? == 0, "the base reused an adapter's blocks");
    ensure!(
        reused(lora(0))? > 0,
        "the same adapter did not reuse its own blocks"
    );
    ensure!(reused(None)? > 0, "the base did not reuse its own blocks");
    Ok(())
}

#[test]
fn a_bad_adapter_fails_its_request_alone() -> Result<()> {
    let dir = engine()?;
    let exec = GenerationExecutor::new(dir.path())?;
    let running = exec.submit(request(prompt(1), lora(0)))?;
    let bad = LoraRequest {
        name: "phi3".into(),
        id: 99,
        path: fixtures().join("lora/tiny-phi3-r8-fused"),
    };
    let e = exec
        .submit(request(prompt(2), Some(bad)))
        .err()
        .map(|e| e.to_string());
    ensure!(
        e.as_deref()
            .is_some_and(|e| e.contains("LoRA adapter phi3")),
        "{e:?}"
    );
    // One id names one adapter.
    let clash = LoraRequest {
        path: Path::new("/elsewhere").into(),
        ..lora(0).expect("adapter 0")
    };
    let e = exec
        .submit(request(prompt(3), Some(clash)))
        .err()
        .map(|e| e.to_string());
    ensure!(
        e.as_deref().is_some_and(|e| e.contains("id 10 is adapter")),
        "{e:?}"
    );
    ensure!(running.wait()?.tokens.len() == 8);
    Ok(())
}
