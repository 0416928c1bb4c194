//! Batch invariance of `linear`: under [`Tactic::invariant`], each output row is bit for bit
//! the row computed alone, whatever the row count and the row's place among them, on every
//! instruction-set path and weight format.

use crate::cpu::testutil::{bf16_bits, every_path, rand_vec};
use crate::cpu::{linear_with, Int4Weights, Int8Weights, MatRef, Tactic, WeightData};

fn check(name: &str, w: MatRef<'_>, bias: &[f32]) {
    let (n, k) = (w.rows(), w.cols());
    let invariant = Tactic {
        invariant: true,
        ..Tactic::default()
    };
    let rows = 100;
    let x = rand_vec(rows * k, 1);
    every_path(|| {
        let alone: Vec<Vec<f32>> = (0..rows)
            .map(|i| {
                let mut y = vec![0f32; n];
                linear_with(&x[i * k..(i + 1) * k], 1, w, Some(bias), &mut y, &invariant).unwrap();
                y
            })
            .collect();
        for (first, m) in [
            (0, 2),
            (3, 4),
            (1, 5),
            (7, 6),
            (0, 12),
            (20, 13),
            (5, 32),
            (9, 33),
            (0, 100),
        ] {
            let m = m.min(rows - first);
            let mut y = vec![0f32; m * n];
            let xs = &x[first * k..(first + m) * k];
            linear_with(xs, m, w, Some(bias), &mut y, &invariant).unwrap();
            for (r, got) in y.chunks_exact(n).enumerate() {
                let same = got
                    .iter()
                    .zip(&alone[first + r])
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(
                    same,
                    "{name}: row {} of {m} differs from it alone",
                    first + r
                );
            }
        }
    });
}

#[test]
fn every_row_count_gives_each_row_its_alone_bits() {
    let (n, k) = (70, 100);
    let w = rand_vec(n * k, 2);
    let bias = rand_vec(n, 3);
    let bf = bf16_bits(&w);
    check(
        "f32",
        MatRef::new(WeightData::F32(&w), n, k).unwrap(),
        &bias,
    );
    check(
        "bf16",
        MatRef::new(WeightData::Bf16(&bf), n, k).unwrap(),
        &bias,
    );
    let (k, group) = (128, 32);
    let q8: Vec<i8> = (0..n * k).map(|i| (i * 37 % 255) as i8).collect();
    let q4: Vec<u8> = (0..n * k / 2).map(|i| (i * 91 % 256) as u8).collect();
    let scales: Vec<f32> = rand_vec(n * k / group, 4)
        .iter()
        .map(|v| 0.01 + v.abs())
        .collect();
    let offsets = rand_vec(n * k / group, 5);
    let int8 = Int8Weights {
        q: &q8,
        scales: &scales,
        offsets: None,
        group,
    };
    check(
        "int8",
        MatRef::new(WeightData::Int8(int8), n, k).unwrap(),
        &bias,
    );
    let int4 = Int4Weights {
        q: &q4,
        scales: &scales,
        offsets: Some(&offsets),
        group,
    };
    check(
        "int4 zero point",
        MatRef::new(WeightData::Int4(int4), n, k).unwrap(),
        &bias,
    );
}
