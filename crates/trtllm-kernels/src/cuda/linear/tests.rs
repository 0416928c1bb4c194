//! The linear launchers against the CPU's `linear` on random weights in every storage. They need
//! a GPU: `cargo xtask test-gpu` runs them.

use super::super::tests::{assert_close, device};
use super::{DeviceWeights, Half};
use crate::cpu::{self, testutil::rand_vec, MatRef, WeightData};
use crate::cuda::{CudaDevice, DeviceMatrix};

/// Random codes and scales for an `n × k` matrix in each packed format, on the host and device.
fn packed_cases(
    d: &CudaDevice,
    n: usize,
    k: usize,
) -> Vec<(&'static str, Vec<f32>, DeviceWeights)> {
    let bytes = |len: usize, seed: u64| -> Vec<u8> {
        rand_vec(len, seed)
            .iter()
            .map(|v| ((v + 1.0) * 127.9) as u8)
            .collect()
    };
    let scales = |len: usize, seed: u64| -> Vec<f32> {
        rand_vec(len, seed)
            .iter()
            .map(|v| 0.01 + v.abs() * 0.02)
            .collect()
    };
    let dense = |data: WeightData<'_>| -> Vec<f32> {
        let m = MatRef::new(data, n, k).unwrap();
        let mut out = vec![0f32; n * k];
        for r in 0..n {
            m.row_to_f32(r, &mut out[r * k..(r + 1) * k]);
        }
        out
    };
    let group = 64;
    let g = n * k.div_ceil(group);
    let q8: Vec<i8> = bytes(n * k, 10).iter().map(|&b| b as i8).collect();
    let s8 = scales(g, 11);
    let q4 = bytes(n * k / 2, 12);
    let (s4, o4) = (scales(g, 13), rand_vec(g, 14));
    let qf = bytes(n * k, 15)
        .iter()
        .map(|&b| if b & 0x7f == 0x7f { 0x7e } else { b })
        .collect::<Vec<_>>();
    let sf = scales(n, 16);
    let qn = bytes(n * k / 2, 17);
    let bn: Vec<u8> = bytes(n * k / 16, 18)
        .iter()
        .map(|&b| 0x30 + b % 0x20)
        .collect();
    let int8 = cpu::Int8Weights {
        q: &q8,
        scales: &s8,
        offsets: None,
        group,
    };
    let int4 = cpu::Int4Weights {
        q: &q4,
        scales: &s4,
        offsets: Some(&o4),
        group,
    };
    let int4s = cpu::Int4Weights {
        offsets: None,
        ..int4
    };
    let int8z = cpu::Int8Weights {
        offsets: Some(&o4),
        ..int8
    };
    // Groups of 16 (GGML's Q6_K, Q3_K, Q2_K kept).
    let g16 = n * k / 16;
    let (s16, o16) = (scales(g16, 19), rand_vec(g16, 20));
    let int8_16 = cpu::Int8Weights {
        scales: &s16,
        group: 16,
        ..int8
    };
    let int4_16 = cpu::Int4Weights {
        scales: &s16,
        offsets: Some(&o16),
        group: 16,
        ..int4
    };
    let fp8 = cpu::Fp8Weights {
        q: &qf,
        scales: &sf,
    };
    let nvfp4 = cpu::Nvfp4Weights {
        q: &qn,
        block_scales: &bn,
        global_scale: 0.7,
    };
    let up = |v: &[f32]| d.upload(v).unwrap();
    let upb = |v: &[u8]| d.upload(v).unwrap();
    vec![
        (
            "int8 g64",
            dense(WeightData::Int8(int8)),
            DeviceWeights::Int8 {
                q: d.upload(&q8).unwrap(),
                scales: up(&s8),
                offsets: None,
                group,
            },
        ),
        (
            "int8 g64 zp",
            dense(WeightData::Int8(int8z)),
            DeviceWeights::Int8 {
                q: d.upload(&q8).unwrap(),
                scales: up(&s8),
                offsets: Some(up(&o4)),
                group,
            },
        ),
        (
            "int8 g16",
            dense(WeightData::Int8(int8_16)),
            DeviceWeights::Int8 {
                q: d.upload(&q8).unwrap(),
                scales: up(&s16),
                offsets: None,
                group: 16,
            },
        ),
        (
            "int4 g16 zp",
            dense(WeightData::Int4(int4_16)),
            DeviceWeights::Int4 {
                q: upb(&q4),
                scales: up(&s16),
                offsets: Some(up(&o16)),
                group: 16,
            },
        ),
        (
            "int4 g64 zp",
            dense(WeightData::Int4(int4)),
            DeviceWeights::Int4 {
                q: upb(&q4),
                scales: up(&s4),
                offsets: Some(up(&o4)),
                group,
            },
        ),
        (
            "int4 g64 sym",
            dense(WeightData::Int4(int4s)),
            DeviceWeights::Int4 {
                q: upb(&q4),
                scales: up(&s4),
                offsets: None,
                group,
            },
        ),
        (
            "fp8",
            dense(WeightData::Fp8(fp8)),
            DeviceWeights::Fp8 {
                q: upb(&qf),
                scales: up(&sf),
            },
        ),
        (
            "nvfp4",
            dense(WeightData::Nvfp4(nvfp4)),
            DeviceWeights::Nvfp4 {
                q: upb(&qn),
                block_scales: upb(&bn),
                global_scale: 0.7,
            },
        ),
    ]
}

#[test]
#[ignore = "needs a CUDA GPU: cargo xtask test-gpu"]
fn packed_linear_matches_dequantized_reference() {
    let d = device();
    let (n, k) = (203, 352);
    let bias = rand_vec(n, 20);
    for (name, dense, w) in packed_cases(&d, n, k) {
        // m = 3 runs the matrix-vector kernels, m = 77 the tiled GEMM.
        for m in [1, 3, 77] {
            let x = rand_vec(m * k, 21);
            let mut y = d.zeros::<f32>(m * n).unwrap();
            d.linear(
                &w,
                &d.upload(&x).unwrap(),
                (n, k),
                Some(&d.upload(&bias).unwrap()),
                &mut y,
            )
            .unwrap();
            let mut want = vec![0f32; m * n];
            let wm = MatRef::new(WeightData::F32(&dense), n, k).unwrap();
            cpu::linear(&x, m, wm, Some(&bias), &mut want).unwrap();
            assert_close(
                &d.download(&y).unwrap(),
                &want,
                1e-4,
                &format!("{name} m={m}"),
            );
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU: cargo xtask test-gpu"]
fn dense_linear_through_cublas_matches_cpu() {
    let d = device();
    let (n, k) = (131, 96);
    let w = rand_vec(n * k, 50);
    let bias = rand_vec(n, 51);
    let wd = d.upload(&w).unwrap();
    let bd = d.upload(&bias).unwrap();
    for m in [1, 77] {
        let x = rand_vec(m * k, 52);
        let xd = d.upload(&x).unwrap();
        for with_bias in [false, true] {
            let b = with_bias.then_some(&bias[..]);
            let mut y = d.upload(&vec![f32::NAN; m * n]).unwrap();
            d.dense_linear(&wd, &xd, (n, k), with_bias.then_some(&bd), &mut y)
                .unwrap();
            let mut want = vec![0f32; m * n];
            let wm = MatRef::new(WeightData::F32(&w), n, k).unwrap();
            cpu::linear(&x, m, wm, b, &mut want).unwrap();
            assert_close(
                &d.download(&y).unwrap(),
                &want,
                1e-4,
                &format!("dense m={m} bias={with_bias}"),
            );
        }
    }
}

/// `m` rows of activations that bf16 and f16 both hold exactly (multiples of 1/256 in [-1, 1]),
/// so a GEMM that rounds its activations to 16 bits sees the CPU's inputs.
fn half_exact_rows(m: usize, k: usize, seed: u64) -> Vec<f32> {
    rand_vec(m * k, seed)
        .iter()
        .map(|v| (v * 256.0).round() / 256.0)
        .collect()
}

fn cpu_linear(w: WeightData<'_>, (n, k): (usize, usize), x: &[f32], bias: &[f32]) -> Vec<f32> {
    let m = x.len() / k;
    let mut y = vec![0f32; m * n];
    cpu::linear(x, m, MatRef::new(w, n, k).unwrap(), Some(bias), &mut y).unwrap();
    y
}

fn gpu_matmul(d: &CudaDevice, w: &DeviceMatrix, x: &[f32], bias: &[f32]) -> Vec<f32> {
    let mut y = d.zeros::<f32>(x.len() / w.cols * w.rows).unwrap();
    d.matmul(
        w,
        &d.upload(x).unwrap(),
        Some(&d.upload(bias).unwrap()),
        &mut y,
    )
    .unwrap();
    d.download(&y).unwrap()
}

#[test]
#[ignore = "needs a CUDA GPU: cargo xtask test-gpu"]
fn half_weights_stay_16_bit_and_match_cpu() {
    let d = device();
    let (n, k) = (150, 320);
    let bias = rand_vec(n, 70);
    let f = rand_vec(n * k, 71);
    let bf16: Vec<u16> = f.iter().map(|v| (v.to_bits() >> 16) as u16).collect();
    // f16 bits of values in (-1, 1): sign, a biased exponent below 15 and a random mantissa.
    let f16: Vec<u16> = f
        .iter()
        .map(|v| {
            let sign = if *v < 0.0 { 0x8000 } else { 0 };
            sign | (((v.abs() * 14.0) as u16) << 10) | (v.to_bits() as u16 & 0x3ff)
        })
        .collect();
    for (name, data, half) in [
        ("bf16", WeightData::Bf16(&bf16), Half::Bf16),
        ("f16", WeightData::F16(&f16), Half::F16),
    ] {
        let w = d
            .upload_matrix(MatRef::new(data, n, k).unwrap(), None)
            .unwrap();
        assert!(matches!(&w.data, crate::cuda::DeviceData::Half(_, h) if *h == half));
        // m = 3: the matrix-vector kernel; m = 77: cuBLAS over 16-bit activations.
        for m in [1, 3, 77] {
            let x = half_exact_rows(m, k, 72);
            let want = cpu_linear(data, (n, k), &x, &bias);
            let got = gpu_matmul(&d, &w, &x, &bias);
            assert_close(&got, &want, 1e-4, &format!("{name} m={m}"));
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU: cargo xtask test-gpu"]
fn w8a8_matches_cpu_bit_for_bit() {
    let d = device();
    let (n, k) = (203, 352);
    let bias = rand_vec(n, 80);
    let q: Vec<i8> = rand_vec(n * k, 81)
        .iter()
        .map(|v| (v * 127.0) as i8)
        .collect();
    let scales: Vec<f32> = rand_vec(n, 82)
        .iter()
        .map(|v| 0.001 + v.abs() * 0.01)
        .collect();
    let data = WeightData::W8A8(cpu::Int8Weights {
        q: &q,
        scales: &scales,
        offsets: None,
        group: k,
    });
    let w = d
        .upload_matrix(MatRef::new(data, n, k).unwrap(), None)
        .unwrap();
    // m = 1 and 8: dp4a; 9 and 130: the int8 tensor-core GEMM, with partial tiles both ways.
    for m in [1, 8, 9, 130] {
        let mut x = rand_vec(m * k, 83 + m as u64);
        x[..k].fill(0.0); // an all-zero row takes the scale-1 branch
        let want = cpu_linear(data, (n, k), &x, &bias);
        let got = gpu_matmul(&d, &w, &x, &bias);
        assert_close(&got, &want, 0.0, &format!("w8a8 m={m}"));
    }
}

#[test]
#[ignore = "needs a CUDA GPU: cargo xtask test-gpu"]
fn fp8_input_scale_rounds_activations_and_uses_tensor_cores_where_present() {
    let d = device();
    let (n, k) = (203, 352);
    let bias = rand_vec(n, 90);
    let qf: Vec<u8> = rand_vec(n * k, 91)
        .iter()
        .map(|v| ((v + 1.0) * 60.0) as u8) // magnitudes up to 2^-1 · 1.875 keep sums modest
        .collect();
    let sf: Vec<f32> = rand_vec(n, 92)
        .iter()
        .map(|v| 0.01 + v.abs() * 0.02)
        .collect();
    let data = WeightData::Fp8(cpu::Fp8Weights {
        q: &qf,
        scales: &sf,
    });
    let input_scale = 0.004;
    let w = d
        .upload_matrix(MatRef::new(data, n, k).unwrap(), Some(input_scale))
        .unwrap();
    assert_eq!(
        d.has_fp8_tensor_cores(),
        d.compute_capability().0 >= 9,
        "sm_90 PTX carries the FP8 GEMM"
    );
    for m in [3, 77] {
        let x = rand_vec(m * k, 93);
        // The reference: activations through E4M3 on the device (checked against the codes in
        // cuda::tests), then the CPU's FP8 weight-only product.
        let mut xq = d.upload(&x).unwrap();
        d.fp8_qdq(&mut xq, input_scale).unwrap();
        let want = cpu_linear(data, (n, k), &d.download(&xq).unwrap(), &bias);
        let got = gpu_matmul(&d, &w, &x, &bias);
        // Hopper's FP8 MMA accumulates with fewer mantissa bits than f32.
        let tol = if m > 8 && d.has_fp8_tensor_cores() {
            2e-3
        } else {
            1e-4
        };
        assert_close(&got, &want, tol, &format!("fp8 m={m}"));
    }
    if !d.has_fp8_tensor_cores() {
        let (q, s) = (d.upload(&qf).unwrap(), d.upload(&sf).unwrap());
        let x = d.upload(&rand_vec(16 * k, 94)).unwrap();
        let mut y = d.zeros::<f32>(16 * n).unwrap();
        let err = d
            .fp8_linear((&q, &s), input_scale, &x, (n, k), None, &mut y)
            .unwrap_err();
        assert!(err.to_string().contains("FP8 tensor-core"), "{err}");
    }
}

/// Batch invariance: a row's outputs are the same bits whether it runs alone, among 9 rows (past
/// the matrix-vector kernels' usual limit) or among 70 (cuBLAS, the tiled GEMMs and the FP8
/// tensor cores otherwise), in every storage.
#[test]
#[ignore = "needs a CUDA GPU: cargo xtask test-gpu"]
fn invariant_products_give_a_row_the_same_bits_at_every_row_count() {
    let mut d = device();
    d.set_batch_invariant(true);
    let (n, k) = (75, 160);
    let bias = rand_vec(n, 100);
    let f = rand_vec(n * k, 101);
    let bf16: Vec<u16> = f.iter().map(|v| (v.to_bits() >> 16) as u16).collect();
    let fp8: Vec<u8> = f.iter().map(|v| ((v + 1.0) * 60.0) as u8).collect();
    let row_scales = vec![0.02f32; n];
    let fp8 = WeightData::Fp8(cpu::Fp8Weights {
        q: &fp8,
        scales: &row_scales,
    });
    let upload = |data, input_scale| {
        d.upload_matrix(MatRef::new(data, n, k).unwrap(), input_scale)
            .unwrap()
    };
    let mut cases = vec![
        ("f32", upload(WeightData::F32(&f), None)),
        ("bf16", upload(WeightData::Bf16(&bf16), None)),
        ("fp8 with an input scale", upload(fp8, Some(0.004))),
    ];
    for (name, _, w) in packed_cases(&d, n, k) {
        let data = crate::cuda::DeviceData::Packed(w);
        let (rows, cols, input_scale) = (n, k, None);
        cases.push((
            name,
            DeviceMatrix {
                data,
                rows,
                cols,
                input_scale,
            },
        ));
    }
    let x = rand_vec(70 * k, 102);
    for (name, w) in &cases {
        let all = gpu_matmul(&d, w, &x, &bias);
        for rows in [0..1, 69..70, 0..9, 30..39] {
            let part = gpu_matmul(&d, w, &x[rows.start * k..rows.end * k], &bias);
            let same = part
                .iter()
                .zip(&all[rows.start * n..rows.end * n])
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(
                same,
                "{name}: rows {rows:?} differ from the same rows among 70"
            );
        }
    }
}
