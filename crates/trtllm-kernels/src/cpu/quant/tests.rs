use super::*;

use crate::cpu::testutil::{assert_close, every_path, rand_vec};
use crate::cpu::{linear, linear_with, MatRef, Tactic, WeightData};
use rand::{rngs::StdRng, Rng, SeedableRng};

fn bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.random()).collect()
}

fn positive(n: usize, seed: u64) -> Vec<f32> {
    rand_vec(n, seed).iter().map(|v| 0.01 + v.abs()).collect()
}

/// `x · Wᵀ + bias` in f64 over the scalar dequantization of every row, and for each output
/// the sum of the products' magnitudes (what f32 rounding error scales with).
fn reference(x: &[f32], m: usize, w: MatRef<'_>, bias: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let (n, k) = (w.rows(), w.cols());
    let mut row = vec![0f32; k];
    let mut y = vec![0f32; m * n];
    let mut mag = vec![0f32; m * n];
    for j in 0..n {
        w.row_to_f32(j, &mut row);
        for i in 0..m {
            let terms = (0..k).map(|q| x[i * k + q] as f64 * row[q] as f64);
            y[i * n + j] = terms.clone().sum::<f64>() as f32 + bias[j];
            mag[i * n + j] = terms.map(f64::abs).sum::<f64>() as f32 + bias[j].abs();
        }
    }
    (y, mag)
}

fn assert_within_rounding(y: &[f32], expect: &[f32], mag: &[f32], what: &str) {
    for (i, ((a, b), m)) in y.iter().zip(expect).zip(mag).enumerate() {
        assert!(
            (a - b).abs() <= 1e-5 * m.max(1.0),
            "{what} [{i}]: {a} vs {b} (magnitude {m})"
        );
    }
}

/// Every packed format through both `linear` paths (GEMV below 4 rows, packed GEMM above),
/// SIMD and portable, against its own scalar dequantization.
#[test]
fn packed_formats_match_dequantized_reference_on_awkward_shapes() {
    // E4M3 codes 0x7f / 0xff are NaN: draw scales and FP8 codes from the finite range.
    let finite = |v: Vec<u8>| -> Vec<u8> { v.into_iter().map(|b| b & 0xf7 ^ 0x30).collect() };
    for &(n, k, group) in &[
        (1, 32, 32),
        (7, 96, 64),
        (13, 160, 128),
        (33, 608, 128),
        (5, 64, 32),
        (21, 64, 32),
        // Groups of 16 (GGML's Q6_K, Q3_K, Q2_K sub-blocks), two to a block.
        (9, 96, 16),
        (3, 32, 16),
    ] {
        let g = groups(k, group);
        let q8: Vec<i8> = bytes(n * k, 1).into_iter().map(|b| b as i8).collect();
        let q4 = bytes(n * k / 2, 2);
        let q_fp8 = finite(bytes(n * k, 3));
        let block_scales = finite(bytes(n * k / 16, 4));
        let scales = positive(n * g, 5);
        let offsets = rand_vec(n * g, 6);
        let row_scales = positive(n, 7);
        let formats = [
            (
                "int8",
                WeightData::Int8(Int8Weights {
                    q: &q8,
                    scales: &scales,
                    offsets: None,
                    group,
                }),
            ),
            (
                "int8 zero point",
                WeightData::Int8(Int8Weights {
                    q: &q8,
                    scales: &scales,
                    offsets: Some(&offsets),
                    group,
                }),
            ),
            (
                "int4 symmetric",
                WeightData::Int4(Int4Weights {
                    q: &q4,
                    scales: &scales,
                    offsets: None,
                    group,
                }),
            ),
            (
                "int4 zero point",
                WeightData::Int4(Int4Weights {
                    q: &q4,
                    scales: &scales,
                    offsets: Some(&offsets),
                    group,
                }),
            ),
            (
                "fp8",
                WeightData::Fp8(Fp8Weights {
                    q: &q_fp8,
                    scales: &row_scales,
                }),
            ),
            (
                "nvfp4",
                WeightData::Nvfp4(Nvfp4Weights {
                    q: &q4,
                    block_scales: &block_scales,
                    global_scale: 0.37,
                }),
            ),
        ];
        for (name, data) in formats {
            let w = MatRef::new(data, n, k).unwrap();
            for m in [1, 2, 3, 5, 37] {
                let x = rand_vec(m * k, 10 + m as u64);
                let bias = rand_vec(n, 11);
                let (expect, mag) = reference(&x, m, w, &bias);
                every_path(|| {
                    let mut y = vec![0f32; m * n];
                    linear(&x, m, w, Some(&bias), &mut y).unwrap();
                    let what = format!("{name} n={n} k={k} g={group} m={m}");
                    assert_within_rounding(&y, &expect, &mag, &what);
                    // The GEMV's 8-row tiles (a tuned tactic) and no prefetch.
                    let wide = Tactic {
                        wide_tiles: true,
                        prefetch_rows: 0,
                        ..Tactic::default()
                    };
                    linear_with(&x, m, w, Some(&bias), &mut y, &wide).unwrap();
                    assert_within_rounding(&y, &expect, &mag, &format!("{what} wide tiles"));
                });
            }
        }
    }
}

#[test]
fn w8a8_matches_integer_reference() {
    let (n, k) = (19, 96);
    let q: Vec<i8> = bytes(n * k, 1)
        .into_iter()
        .map(|b| (b as i8).max(-127))
        .collect();
    let scales = positive(n, 2);
    let w = MatRef::new(
        WeightData::W8A8(Int8Weights {
            q: &q,
            scales: &scales,
            offsets: None,
            group: k,
        }),
        n,
        k,
    )
    .unwrap();
    for m in [1, 6] {
        let x = rand_vec(m * k, 3);
        let mut expect = vec![0f32; m * n];
        for i in 0..m {
            let row = &x[i * k..(i + 1) * k];
            let sx = row.iter().fold(0f32, |a, v| a.max(v.abs())) / 127.0;
            let xq: Vec<i32> = row.iter().map(|v| (v / sx).round() as i32).collect();
            for j in 0..n {
                let d: i32 = (0..k).map(|c| xq[c] * q[j * k + c] as i32).sum();
                expect[i * n + j] = d as f32 * sx * scales[j];
            }
        }
        every_path(|| {
            let mut y = vec![0f32; m * n];
            linear(&x, m, w, None, &mut y).unwrap();
            assert_close(&y, &expect, 1e-5);
        });
    }
    let per_group = Int8Weights {
        q: &q,
        scales: &positive(n * 3, 4),
        offsets: None,
        group: 32,
    };
    assert!(MatRef::new(WeightData::W8A8(per_group), n, k).is_err());
    let offsets = vec![0.5f32; n];
    let zero_point = Int8Weights {
        q: &q,
        scales: &positive(n, 4),
        offsets: Some(&offsets),
        group: k,
    };
    assert!(MatRef::new(WeightData::W8A8(zero_point), n, k).is_err());
}

#[test]
fn e4m3_decodes_normals_subnormals_and_signs() {
    assert_eq!(e4m3_to_f32(0x00), 0.0);
    assert_eq!(e4m3_to_f32(0x38), 1.0); // exponent 7 = bias
    assert_eq!(e4m3_to_f32(0x7e), 448.0);
    assert_eq!(e4m3_to_f32(0xfe), -448.0);
    assert_eq!(e4m3_to_f32(0x01), 2f32.powi(-9)); // smallest subnormal
    assert_eq!(e4m3_to_f32(0x08), 2f32.powi(-6)); // smallest normal
    assert_eq!(e4m3_to_f32(0x3c), 1.5);
}

#[test]
fn int4_block_layout_and_symmetric_codes() {
    // One 32-value row: byte i = (i & 15) | (15 - i) << 4.
    let q: Vec<u8> = (0..16u8).map(|i| i | ((15 - i) << 4)).collect();
    let w = Int4Weights {
        q: &q,
        scales: &[0.5],
        offsets: None,
        group: 32,
    };
    w.check(1, 32).unwrap();
    let mut out = [0f32; 32];
    w.row_to_f32(0, 32, &mut out);
    assert_eq!((out[0], out[3], out[16], out[31]), (-4.0, -2.5, 3.5, -4.0));
    assert!(w.check(1, 64).is_err());
    let bad_group = Int4Weights { group: 48, ..w };
    assert!(bad_group.check(1, 32).is_err());
}
