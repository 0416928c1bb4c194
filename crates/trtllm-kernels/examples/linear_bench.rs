//! Quick GFLOP/s probe of the linear kernel: `cargo run --release -p trtllm-kernels --example linear_bench`.
use std::time::Instant;
use trtllm_kernels::cpu::{
    linear, paged_attention, AttentionSeq, AttentionShape, KvData, MatRef, PagedKv, WeightData,
};

fn main() {
    for &(m, n, k) in &[
        (512usize, 1536usize, 576usize),
        (512, 576, 1536),
        (512, 49152, 576),
        (8, 1536, 576),
        (16, 1536, 576),
        (32, 1536, 576),
        (64, 1536, 576),
        (128, 1536, 576),
        (32, 576, 1536),
        (32, 49152, 576),
        (1, 1536, 576),
        (1, 49152, 576),
    ] {
        let x: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
        let w: Vec<f32> = (0..n * k).map(|i| (i % 5) as f32 * 0.1).collect();
        let mut y = vec![0f32; m * n];
        let wm = MatRef::new(WeightData::F32(&w), n, k).unwrap();
        let reps = (2e10 / (2.0 * (m * n * k) as f64)).clamp(3.0, 2000.0) as usize;
        linear(&x, m, wm, None, &mut y).unwrap();
        let t = Instant::now();
        for _ in 0..reps {
            linear(&x, m, wm, None, &mut y).unwrap();
        }
        let s = t.elapsed().as_secs_f64() / reps as f64;
        println!(
            "m={m:4} n={n:6} k={k:5}: {:7.1} GFLOP/s  {:6.1} GB/s weights",
            2.0 * (m * n * k) as f64 / s / 1e9,
            (n * k * 4) as f64 / s / 1e9
        );
    }
    let (nh, nkv, hd, len) = (9, 3, 64, 512);
    let q: Vec<f32> = (0..len * nh * hd).map(|i| (i % 7) as f32 * 0.01).collect();
    let kv: Vec<f32> = (0..len * nkv * hd).map(|i| (i % 5) as f32 * 0.01).collect();
    let blocks: Vec<u32> = (0..(len / 32) as u32).collect();
    let mut out = vec![0f32; q.len()];
    let s = AttentionShape {
        n_heads: nh,
        n_kv_heads: nkv,
        head_dim: hd,
        scale: 0.125,
    };
    let t = Instant::now();
    for _ in 0..5 {
        let seq = AttentionSeq {
            blocks: &blocks,
            past: 0,
            n_new: len,
        };
        let kv = PagedKv {
            k: KvData::F32(&kv),
            v: KvData::F32(&kv),
            block_size: 32,
        };
        paged_attention(&q, kv, &[seq], s, &mut out).unwrap();
    }
    println!(
        "attention prefill 512 (one layer): {:.2} ms",
        t.elapsed().as_secs_f64() / 5.0 * 1e3
    );
}
