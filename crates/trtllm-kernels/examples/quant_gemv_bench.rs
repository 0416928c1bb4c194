//! Decode (m = 1) GB/s of each weight format at SmolLM2's shapes:
//! `cargo run --release -p trtllm-kernels --example quant_gemv_bench`.
use std::time::Instant;
use trtllm_kernels::cpu::{
    linear, Fp8Weights, Int4Weights, Int8Weights, MatRef, Nvfp4Weights, WeightData,
};

fn main() {
    for &(n, k) in &[(1536usize, 576usize), (576, 1536), (49152, 576)] {
        let x: Vec<f32> = (0..k).map(|i| (i % 7) as f32 * 0.1).collect();
        let f: Vec<f32> = (0..n * k).map(|i| (i % 5) as f32 * 0.1).collect();
        let q8: Vec<i8> = (0..n * k).map(|i| (i % 251) as i8).collect();
        let q4: Vec<u8> = (0..n * k / 2).map(|i| (i % 251) as u8).collect();
        let s = vec![0.01f32; n * k.div_ceil(32)];
        let s_row = vec![0.01f32; n];
        let bs = vec![0x30u8; n * k / 16];
        let formats: [(&str, WeightData, usize); 6] = [
            ("f32", WeightData::F32(&f), n * k * 4),
            (
                "int8 pc",
                WeightData::Int8(Int8Weights {
                    q: &q8,
                    scales: &s_row,
                    offsets: None,
                    group: k,
                }),
                n * k,
            ),
            (
                "int4 g32",
                WeightData::Int4(Int4Weights {
                    q: &q4,
                    scales: &s,
                    offsets: Some(&s),
                    group: 32,
                }),
                n * k / 2,
            ),
            (
                "int4 g128",
                WeightData::Int4(Int4Weights {
                    q: &q4,
                    scales: &s[..n * k.div_ceil(128)],
                    offsets: None,
                    group: 128,
                }),
                n * k / 2,
            ),
            (
                "fp8",
                WeightData::Fp8(Fp8Weights {
                    q: &q4.iter().chain(&q4).map(|b| b & 0x77).collect::<Vec<_>>(),
                    scales: &s_row,
                }),
                n * k,
            ),
            (
                "nvfp4",
                WeightData::Nvfp4(Nvfp4Weights {
                    q: &q4,
                    block_scales: &bs,
                    global_scale: 1.0,
                }),
                n * k / 2,
            ),
        ];
        for (name, data, bytes) in formats {
            let w = MatRef::new(data, n, k).unwrap();
            let mut y = vec![0f32; n];
            let reps = (4e9 / bytes as f64).clamp(3.0, 5000.0) as usize;
            linear(&x, 1, w, None, &mut y).unwrap();
            let t = Instant::now();
            for _ in 0..reps {
                linear(&x, 1, w, None, &mut y).unwrap();
            }
            let secs = t.elapsed().as_secs_f64() / reps as f64;
            println!(
                "n={n:6} k={k:5} {name:10}: {:7.1} GB/s packed  {:6.1} Gweights/s",
                bytes as f64 / secs / 1e9,
                (n * k) as f64 / secs / 1e9
            );
        }
    }
}
