//! Quantized engines of SmolLM2-135M-Instruct, measured as perplexity on the golden perplexity
//! ids (Apache-2.0 license text) relative to the float32 engine built from the same GGUF.

use anyhow::Result;
use trtllm_api::builder::BuildConfig;
use trtllm_api::runtime::quant::{DType, LayerQuantConfig, QuantAlgo, QuantConfig};
use trtllm_api::{LlmArgs, Prompt, SamplingParams, LLM};
use trtllm_tests::{build_smollm2, fixtures, read_json, SmolGolden};

fn golden() -> SmolGolden {
    read_json(&fixtures().join("smollm2-135m-instruct.json")).expect("golden file")
}

fn config(quant: QuantConfig, keep_quantized: bool) -> BuildConfig {
    BuildConfig {
        max_seq_len: 2048,
        quant: LayerQuantConfig::uniform(quant),
        keep_quantized,
        ..BuildConfig::default()
    }
}

/// Mean NLL of the golden perplexity ids under an engine built with `config`, and the engine.
fn nll(config: &BuildConfig) -> Result<(f64, LLM, tempfile::TempDir)> {
    let dir = build_smollm2(config)?;
    let llm = LLM::new(LlmArgs {
        model: dir.path().into(),
        ..Default::default()
    })?;
    let p = llm.perplexity(&golden().perplexity.input_ids)?;
    Ok((p.mean_nll, llm, dir))
}

fn weights(algo: QuantAlgo) -> BuildConfig {
    config(QuantConfig::for_algo(algo), false)
}

fn kv(algo: QuantAlgo) -> BuildConfig {
    config(
        QuantConfig {
            kv_cache_quant_algo: algo,
            ..QuantConfig::default()
        },
        false,
    )
}

/// `--quant keep` stores the GGUF's own Q4_1 / Q8_0 weights; they stand for exactly the float
/// engine's weights, so perplexity agrees and greedy decoding (through the packed int4/int8
/// matrix-vector kernels) reproduces transformers' golden ids.
#[test]
fn keep_matches_float_engine_and_golden_greedy_ids() -> Result<()> {
    let (f32_nll, _, _f) = nll(&BuildConfig::default())?;
    let (keep_nll, llm, _k) = nll(&config(QuantConfig::default(), true))?;
    eprintln!("mean NLL f32 {f32_nll:.6}, keep {keep_nll:.6}");
    assert!((keep_nll - f32_nll).abs() < 1e-4, "{keep_nll} vs {f32_nll}");
    for (i, case) in golden().cases.iter().enumerate() {
        let params = SamplingParams {
            max_tokens: case.greedy_ids.len(),
            ..Default::default()
        };
        let out = llm.generate(&[Prompt::TokenIds(case.input_ids.clone())], &params)?;
        assert_eq!(out[0].outputs[0].token_ids, case.greedy_ids, "case {i}");
    }
    Ok(())
}

#[test]
fn quantized_perplexity_within_limits_of_float32() -> Result<()> {
    let (base, _, _d) = nll(&BuildConfig::default())?;
    let rel = |c: &BuildConfig| -> Result<f64> { Ok(nll(c)?.0 / base - 1.0) };
    let limits = [
        ("W8A16", weights(QuantAlgo::W8A16), 0.005),
        ("INT8 KV cache", kv(QuantAlgo::Int8), 0.01),
        ("FP8 KV cache", kv(QuantAlgo::Fp8), 0.02),
    ];
    for (name, c, limit) in limits {
        let r = rel(&c)?;
        eprintln!(
            "{name}: mean NLL {:+.3}% vs float32 (limit {:+.1}%)",
            r * 100.0,
            limit * 100.0
        );
        assert!(r < limit, "{name}: {r}");
    }
    Ok(())
}

/// A bf16 or f16 KV cache (half the memory and attention reads of f32) stays within 0.1 % of the
/// f32 cache's perplexity.
#[test]
fn half_precision_kv_cache_within_a_tenth_of_a_percent() -> Result<()> {
    let (base, _, _d) = nll(&BuildConfig::default())?;
    for dtype in [DType::BF16, DType::F16] {
        let c = BuildConfig {
            kv_cache_dtype: Some(dtype),
            ..config(QuantConfig::default(), false)
        };
        let r = nll(&c)?.0 / base - 1.0;
        eprintln!(
            "{} KV cache: mean NLL {:+.4}% vs float32",
            dtype.name(),
            r * 100.0
        );
        assert!(r.abs() < 0.001, "{}: {r}", dtype.name());
    }
    Ok(())
}

/// A calibrated config: 4 × 512 tokens of the built-in calibration text (the GPL v3, not the
/// evaluated Apache-2.0 text); `scaling` toggles the per-channel activation scaling step.
fn calibrated(algo: QuantAlgo, scaling: bool) -> BuildConfig {
    let mut q = QuantConfig::for_algo(algo);
    q.calib_size = 4;
    q.pre_quant_scale = scaling;
    config(q, false)
}

/// Each calibrated algorithm against the same format without its calibrated step: AWQ and
/// GPTQ against round-to-nearest W4A16 g128, SmoothQuant against plain W8A8, NVFP4 with its
/// activation-aware scale search against without it; FP8 reported with and without the search.
#[test]
fn calibrated_quantization_beats_uncalibrated() -> Result<()> {
    let (base, _, _d) = nll(&BuildConfig::default())?;
    let rel = |c: &BuildConfig| -> Result<f64> { Ok(nll(c)?.0 / base - 1.0) };
    let rtn = rel(&weights(QuantAlgo::W4A16))?;
    eprintln!("W4A16 g128 RTN: mean NLL {:+.3}% vs float32", rtn * 100.0);
    let cases = [
        (
            "W4A16 g128 AWQ",
            calibrated(QuantAlgo::W4A16Awq, true),
            None,
        ),
        (
            "W4A16 g128 GPTQ",
            calibrated(QuantAlgo::W4A16Gptq, false),
            None,
        ),
        (
            "W8A8 SmoothQuant",
            calibrated(QuantAlgo::W8A8SqPerChannel, true),
            Some(calibrated(QuantAlgo::W8A8SqPerChannel, false)),
        ),
        (
            "NVFP4",
            calibrated(QuantAlgo::Nvfp4, true),
            Some(calibrated(QuantAlgo::Nvfp4, false)),
        ),
    ];
    for (name, with, without) in cases {
        let r = rel(&with)?;
        let plain = match &without {
            Some(c) => rel(c)?,
            None => rtn,
        };
        eprintln!(
            "{name}: mean NLL {:+.3}% vs float32; without its calibrated step {:+.3}%",
            r * 100.0,
            plain * 100.0
        );
        assert!(r < plain, "{name}: {r} vs {plain}");
        assert!(r > -0.01 && r < 0.5, "{name}: {r}");
    }
    // FP8 keeps three mantissa bits at every magnitude, so per-channel scaling has little left
    // to fix: the static activation scale is its calibrated step, and the optional scale
    // search is reported and must not cost more than noise.
    let fp8 = rel(&calibrated(QuantAlgo::Fp8, false))?;
    let searched = rel(&calibrated(QuantAlgo::Fp8, true))?;
    eprintln!(
        "FP8 (static activation scale): mean NLL {:+.3}% vs float32; with scale search {:+.3}%",
        fp8 * 100.0,
        searched * 100.0
    );
    assert!(fp8 > -0.01 && fp8 < 0.03, "FP8: {fp8}");
    assert!(searched < fp8 + 0.005, "FP8 search: {searched} vs {fp8}");
    Ok(())
}

/// Bad quantization settings fail the build with the field and the limit named.
#[test]
fn bad_quant_configs_are_clear_errors() {
    let tiny = fixtures().join("tiny-llama");
    let build_with = |c: BuildConfig| {
        let out = tempfile::tempdir().expect("tempdir");
        trtllm_api::builder::build(&tiny, out.path(), &c, &mut |_, _, _| {})
            .map(|_| ())
            .unwrap_err()
            .to_string()
    };
    let build = |q: QuantConfig| build_with(config(q, false));
    let e = build(QuantConfig {
        group_size: 96,
        ..QuantConfig::for_algo(QuantAlgo::W4A16Awq)
    });
    assert!(e.contains("group_size") && e.contains("64 or 128"), "{e}");
    let e = build(QuantConfig {
        kv_cache_quant_algo: QuantAlgo::W4A16,
        ..QuantConfig::default()
    });
    assert!(
        e.contains("kv_cache_quant_algo") && e.contains("W4A16"),
        "{e}"
    );
    let e = build(QuantConfig {
        exclude_modules: Some(vec!["lm_head".into(), "mlp.gate_nope".into()]),
        ..QuantConfig::for_algo(QuantAlgo::W8A16)
    });
    assert!(
        e.contains("mlp.gate_nope") && e.contains("layers.0.qkv"),
        "{e}"
    );
    let e = build(QuantConfig {
        calib_dataset: Some("/nonexistent/calib.txt".into()),
        ..QuantConfig::for_algo(QuantAlgo::W4A16Awq)
    });
    assert!(e.contains("/nonexistent/calib.txt"), "{e}");
    let e = build_with(BuildConfig {
        kv_cache_dtype: Some(DType::BF16),
        ..config(
            QuantConfig {
                kv_cache_quant_algo: QuantAlgo::Int8,
                ..QuantConfig::default()
            },
            false,
        )
    });
    assert!(e.contains("bfloat16") && e.contains("exclude"), "{e}");
    let e = build_with(BuildConfig {
        kv_cache_dtype: Some(DType::U8),
        ..config(QuantConfig::default(), false)
    });
    assert!(e.contains("float32, bfloat16 or float16"), "{e}");
    let short = tempfile::NamedTempFile::new().expect("tempfile");
    std::fs::write(short.path(), "Too short to calibrate on.").expect("write");
    let e = build(QuantConfig {
        calib_dataset: Some(short.path().display().to_string()),
        ..QuantConfig::for_algo(QuantAlgo::Fp8)
    });
    assert!(
        e.contains("calib_dataset") && e.contains("at least 64"),
        "{e}"
    );
}

/// Excluded modules stay float; the rest are packed.
#[test]
fn exclude_modules_keep_float_weights() -> Result<()> {
    let tiny = fixtures().join("tiny-llama");
    let out = tempfile::tempdir()?;
    let q = QuantConfig {
        exclude_modules: Some(vec!["lm_head".into(), "layers.0.".into()]),
        ..QuantConfig::for_algo(QuantAlgo::W8A16)
    };
    trtllm_api::builder::build(&tiny, out.path(), &config(q, false), &mut |_, _, _| {})?;
    let session = trtllm_api::runtime::Session::open(out.path())?;
    for t in session.tensors() {
        let packed = t.format.is_some();
        let excluded = t.name.starts_with("layers.0.") || t.name.starts_with("lm_head");
        if t.name.starts_with("layers.") && t.name.ends_with(".weight") && t.shape.len() == 2 {
            assert_eq!(packed, !excluded, "{}", t.name);
        }
    }
    Ok(())
}
