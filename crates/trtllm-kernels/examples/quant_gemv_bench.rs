//! Decode (m = 1) GB/s of each weight format at SmolLM2's shapes:
//! `cargo run --release -p trtllm-kernels --example quant_gemv_bench`.
//! With `model`: every linear of SmolLM2's 30 layers as distinct int4 matrices (streamed from
//! DRAM, as in decode), ms per step and GB/s read, against the read bandwidth in the same run.
#[path = "common/smollm2.rs"]
mod smollm2;
use std::time::Instant;
use trtllm_kernels::cpu::{
    linear, Fp8Weights, Int4Weights, Int8Weights, MatRef, Nvfp4Weights, WeightData,
};

fn main() {
    if std::env::args().any(|a| a == "model") {
        return model();
    }
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
            // Timed inside the pool, as the runtime's forward pass runs: from outside it each
            // call would wake a worker and sleep until it finishes.
            let secs = rayon::scope(|_| {
                let t = Instant::now();
                for _ in 0..reps {
                    linear(&x, 1, w, None, &mut y).unwrap();
                }
                t.elapsed().as_secs_f64() / reps as f64
            });
            println!(
                "n={n:6} k={k:5} {name:10}: {:7.1} GB/s packed  {:6.1} Gweights/s",
                bytes as f64 / secs / 1e9,
                (n * k) as f64 / secs / 1e9
            );
        }
    }
}

/// One int4 matrix: codes, scales and offsets (absent: symmetric codes).
struct Int4 {
    q: Vec<u8>,
    scales: Vec<f32>,
    offsets: Option<Vec<f32>>,
    n: usize,
    k: usize,
}

fn model() {
    let shapes = smollm2::LAYER_LINEARS;
    for (name, group, offsets) in [
        ("int4 g32 + offsets (Q4_1 kept)", 32, true),
        ("int4 g128 (W4A16)", 128, false),
    ] {
        let mats: Vec<Int4> = (0..30)
            .flat_map(|l| shapes.iter().map(move |&s| (l, s)))
            .map(|(l, (n, k))| {
                let g = n * k.div_ceil(group);
                Int4 {
                    q: (0..n * k / 2).map(|i| ((i + l) % 251) as u8).collect(),
                    scales: vec![0.01; g],
                    offsets: offsets.then(|| vec![-0.05; g]),
                    n,
                    k,
                }
            })
            .collect();
        let bytes: usize = mats
            .iter()
            .map(|m| m.q.len() + 4 * (m.scales.len() + m.offsets.as_ref().map_or(0, Vec::len)))
            .sum();
        let x: Vec<f32> = (0..1536).map(|i| (i % 7) as f32 * 0.1).collect();
        let mut y = vec![0f32; 1536];
        let best = rayon::scope(|_| {
            let mut best = f64::MAX;
            for _ in 0..10 {
                let t = Instant::now();
                for m in &mats {
                    let data = WeightData::Int4(Int4Weights {
                        q: &m.q,
                        scales: &m.scales,
                        offsets: m.offsets.as_deref(),
                        group,
                    });
                    let w = MatRef::new(data, m.n, m.k).unwrap();
                    linear(&x[..m.k], 1, w, None, &mut y[..m.n]).unwrap();
                }
                best = best.min(t.elapsed().as_secs_f64());
            }
            best
        });
        println!(
            "model {name}: {:.2} ms per step, {:.1} GB/s of {} MB",
            best * 1e3,
            bytes as f64 / best / 1e9,
            bytes / 1_000_000
        );
    }
}
