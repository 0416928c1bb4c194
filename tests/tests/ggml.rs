//! GGML block dequantization against gguf-py's reference, bit for bit: random blocks of every
//! supported type and real blocks from published GGUF files (tests/fixtures/ggml, made by
//! make_blocks.py). Unsupported types are named.

use anyhow::{bail, ensure, Context, Result};
use trtllm_api::runtime::quant::ggml::GgmlType;
use trtllm_tests::fixtures;

struct Record {
    ty: u32,
    real: bool,
    bytes: Vec<u8>,
    values: Vec<f32>,
}

fn records() -> Result<Vec<Record>> {
    let path = fixtures().join("ggml/ggml_blocks.bin");
    let data = std::fs::read(&path).with_context(|| path.display().to_string())?;
    let mut rest: &[u8] = &data;
    let mut take = |n: usize| -> Result<Vec<u8>> {
        ensure!(rest.len() >= n, "truncated ggml_blocks.bin");
        let (head, tail) = rest.split_at(n);
        rest = tail;
        Ok(head.to_vec())
    };
    let word = |b: &[u8], i: usize| {
        u32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]])
    };
    let mut out = Vec::new();
    let mut left = data.len();
    while left > 0 {
        let head = take(12)?;
        let (ty, blocks, kind) = (word(&head, 0), word(&head, 1), word(&head, 2));
        let t = GgmlType::from_id(ty)?;
        let bytes = take(blocks as usize * t.block_bytes())?;
        let n = blocks as usize * t.block_elems();
        let raw = take(4 * n)?;
        let values = (0..n).map(|i| f32::from_bits(word(&raw, i))).collect();
        left -= 12 + bytes.len() + raw.len();
        out.push(Record {
            ty,
            real: kind == 1,
            bytes,
            values,
        });
    }
    Ok(out)
}

#[test]
fn every_block_type_dequantizes_bit_exactly_like_gguf_py() -> Result<()> {
    let records = records()?;
    let mut random = Vec::new();
    for r in &records {
        let t = GgmlType::from_id(r.ty)?;
        let got = t.dequantize(&r.bytes, r.values.len())?;
        for (i, (g, w)) in got.iter().zip(&r.values).enumerate() {
            if g.to_bits() != w.to_bits() {
                bail!(
                    "{t:?} ({}) element {i}: {g} vs gguf-py {w}",
                    if r.real { "real" } else { "random" }
                );
            }
        }
        if !r.real {
            random.push(t);
        }
    }
    use GgmlType::*;
    let all = [
        Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS,
    ];
    ensure!(
        all.iter().all(|t| random.contains(t)),
        "fixture lacks a type: {random:?}"
    );
    let real: Vec<u32> = records.iter().filter(|r| r.real).map(|r| r.ty).collect();
    ensure!(
        [12, 14, 6].iter().all(|t| real.contains(t)),
        "no real Q4_K/Q6_K/Q5_0 blocks"
    );
    Ok(())
}

/// The types `--quant keep` reads in place stand, packed, for exactly the reference's values.
#[test]
fn packed_imports_keep_the_reference_values_bit_for_bit() -> Result<()> {
    let mut kept = Vec::new();
    for r in records()? {
        let t = GgmlType::from_id(r.ty)?;
        let rows = r.values.len() / t.block_elems();
        let Some(packed) = t.to_packed(&r.bytes, rows, t.block_elems())? else {
            continue;
        };
        let got = packed.dequantize()?;
        for (i, (g, w)) in got.iter().zip(&r.values).enumerate() {
            ensure!(
                g.to_bits() == w.to_bits(),
                "{t:?} packed element {i}: {g} vs {w}"
            );
        }
        kept.push(t);
    }
    use GgmlType::*;
    for t in [
        Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS,
    ] {
        ensure!(kept.contains(&t), "{t:?} was not kept packed");
    }
    Ok(())
}

#[test]
fn unsupported_types_are_named_with_the_supported_list() {
    let e = GgmlType::from_id(16).unwrap_err().to_string();
    assert!(
        e.contains("IQ2_XXS") && e.contains("Q4_K") && e.contains("IQ4_XS"),
        "{e}"
    );
    let e = GgmlType::from_id(99).unwrap_err().to_string();
    assert!(e.contains("id 99"), "{e}");
}
