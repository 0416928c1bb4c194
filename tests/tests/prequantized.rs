//! Hugging Face checkpoints published quantized (tests/fixtures/tiny-llama-{gptq,awq,fp8}-*, made
//! by make_prequantized.py in each format's own layout) build without requantizing: every linear
//! weight keeps the checkpoint's format and groups, and the model matches transformers running
//! the weights as the format's spec dequantizes them.

use anyhow::{ensure, Result};
use trtllm_api::builder::{build, BuildConfig};
use trtllm_api::runtime::quant::WeightFormat;
use trtllm_api::runtime::Session;
use trtllm_tests::{check_tiny_fixture, fixtures};

/// The fixture matches its golden file, and each of its linear weights is stored as `want(cols)`.
fn check(name: &str, want: impl Fn(usize) -> WeightFormat) -> Result<()> {
    let engine = check_tiny_fixture(name)?;
    let session = Session::open(engine.path())?;
    let linears: Vec<_> = session
        .tensors()
        .into_iter()
        .filter(|t| t.name.starts_with("layers.") && t.name.ends_with(".weight"))
        .filter(|t| !t.name.contains("norm"))
        .collect();
    ensure!(
        linears.len() == 3 * 4,
        "{name}: {} linear weights",
        linears.len()
    );
    for t in linears {
        let cols = if t.name.contains("down") { 160 } else { 64 };
        ensure!(
            t.format == Some(want(cols)),
            "{name}: {} stored as {:?}, expected {:?}",
            t.name,
            t.format,
            want(cols)
        );
    }
    Ok(())
}

#[test]
fn gptq_int4_with_zero_points() -> Result<()> {
    check("tiny-llama-gptq-int4", |_| WeightFormat::Int4 {
        group: 32,
        zero_point: true,
    })
}

/// Per channel (group_size −1) and symmetric: one scale per row, no offsets.
#[test]
fn gptq_int8_per_channel_symmetric() -> Result<()> {
    check("tiny-llama-gptq-int8", |cols| WeightFormat::Int8 {
        group: cols,
        zero_point: false,
    })
}

/// Act-order (desc_act): groups are runs of columns only in the order GPTQ visited them, so the
/// weight is stored in that order and the activations are gathered the same way
/// (`{module}.input_perm`).
#[test]
fn gptq_act_order() -> Result<()> {
    check("tiny-llama-gptq-actorder", |_| WeightFormat::Int4 {
        group: 32,
        zero_point: false,
    })?;
    let out = tempfile::tempdir()?;
    let dir = fixtures().join("tiny-llama-gptq-actorder");
    build(&dir, out.path(), &BuildConfig::default(), &mut |_, _, _| {})?;
    let perms = Session::open(out.path())?
        .tensors()
        .into_iter()
        .filter(|t| t.name.ends_with(".input_perm"))
        .count();
    ensure!(perms == 3 * 4, "{perms} input orders stored");
    Ok(())
}

#[test]
fn awq_gemm_packing() -> Result<()> {
    check("tiny-llama-awq", |_| WeightFormat::Int4 {
        group: 32,
        zero_point: true,
    })
}

#[test]
fn fp8_per_channel_compressed_tensors() -> Result<()> {
    check("tiny-llama-fp8-channel", |_| WeightFormat::Fp8)
}

#[test]
fn fp8_per_tensor_modelopt() -> Result<()> {
    check("tiny-llama-fp8-tensor", |_| WeightFormat::Fp8)
}

/// A GPTQ bit width we do not read, a quantization method we do not know, and zero points that
/// contradict the config (found while the engine is being written): one clear error each, and no
/// engine directory left behind.
#[test]
fn bad_prequantized_checkpoints_are_named_and_leave_nothing() -> Result<()> {
    let src = fixtures().join("tiny-llama-gptq-int4");
    let cases = [
        ("bits", serde_json::json!(3), "3 bits"),
        (
            "quant_method",
            serde_json::json!("bitsandbytes"),
            "'bitsandbytes' is not supported",
        ),
        ("sym", serde_json::json!(true), "has zero point"),
    ];
    for (key, value, expect) in cases {
        let tmp = tempfile::tempdir()?;
        let ck = tmp.path().join("checkpoint");
        std::fs::create_dir(&ck)?;
        for f in std::fs::read_dir(&src)? {
            let f = f?;
            std::fs::copy(f.path(), ck.join(f.file_name()))?;
        }
        let mut config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(ck.join("config.json"))?)?;
        config["quantization_config"][key] = value;
        std::fs::write(ck.join("config.json"), config.to_string())?;
        let out = tmp.path().join("engine");
        let err = build(&ck, &out, &BuildConfig::default(), &mut |_, _, _| {})
            .expect_err(key)
            .to_string();
        ensure!(err.contains(expect), "{key}: {err}");
        ensure!(!out.exists(), "{key}: {} left behind", out.display());
    }
    Ok(())
}
