//! Quick GFLOP/s probe of the linear kernel: `cargo run --release -p trtllm-kernels --example linear_bench`.
#[path = "common/smollm2.rs"]
mod smollm2;
use std::time::Instant;
use trtllm_kernels::cpu::{
    linear, paged_attention, AttentionSeq, AttentionShape, KvData, MatRef, PagedKv, WeightData,
};

fn main() {
    if std::env::args().any(|a| a == "attention") {
        return attention();
    }
    if std::env::args().any(|a| a == "model") {
        return model();
    }
    for &(m, n, k) in &[
        (512usize, 1536usize, 576usize),
        (512, 576, 1536),
        (512, 49152, 576),
        (4, 1536, 576),
        (8, 1536, 576),
        (12, 1536, 576),
        (24, 1536, 576),
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
    attention();
}

/// Every linear of SmolLM2-135M's 30 layers and its LM head, distinct weights (540 MB, more
/// than the caches), at 1, 8 and 32 rows: the weight-streaming part of a decode step.
fn model() {
    let shapes = smollm2::LAYER_LINEARS;
    let mut ws: Vec<(Vec<f32>, usize, usize)> = vec![];
    for l in 0..30 {
        for &(n, k) in &shapes {
            ws.push((
                (0..n * k).map(|i| ((i + l) % 5) as f32 * 0.1).collect(),
                n,
                k,
            ));
        }
    }
    ws.push((
        (0..49152 * 576).map(|i| (i % 5) as f32 * 0.1).collect(),
        49152,
        576,
    ));
    let flops: usize = ws.iter().map(|(_, n, k)| 2 * n * k).sum();
    for m in [1usize, 8, 32] {
        let x: Vec<f32> = (0..m * 1536).map(|i| (i % 7) as f32 * 0.1).collect();
        let mut y = vec![0f32; m * 49152];
        let mut best = f64::MAX;
        for _ in 0..5 {
            let t = Instant::now();
            for (w, n, k) in &ws {
                let wm = MatRef::new(WeightData::F32(w), *n, *k).unwrap();
                linear(&x[..m * k], m, wm, None, &mut y[..m * n]).unwrap();
            }
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!(
            "model m={m:2}: {:6.1} ms per step, {:6.1} GFLOP/s",
            best * 1e3,
            (m * flops) as f64 / best / 1e9
        );
    }
}

/// One SmolLM2 layer's attention: a 512-token prefill, and a decode step of 32 sequences at
/// 256 tokens of context.
fn attention() {
    let (nh, nkv, hd, bs) = (9, 3, 64, 32usize);
    let s = AttentionShape {
        n_heads: nh,
        n_kv_heads: nkv,
        head_dim: hd,
        scale: 0.125,
        window: None,
        softcap: None,
    };
    for (name, n_seqs, past, n_new) in [
        ("prefill 512", 1usize, 0usize, 512usize),
        ("decode 32 × 256", 32, 255, 1),
    ] {
        let len = past + n_new;
        let per_seq = len.div_ceil(bs);
        let q: Vec<f32> = (0..n_seqs * n_new * nh * hd)
            .map(|i| (i % 7) as f32 * 0.01)
            .collect();
        let kv: Vec<f32> = (0..n_seqs * per_seq * bs * nkv * hd)
            .map(|i| (i % 5) as f32 * 0.01)
            .collect();
        let tables: Vec<Vec<u32>> = (0..n_seqs)
            .map(|i| ((i * per_seq) as u32..((i + 1) * per_seq) as u32).collect())
            .collect();
        let seqs: Vec<AttentionSeq> = tables
            .iter()
            .map(|b| AttentionSeq {
                blocks: b,
                past,
                n_new,
            })
            .collect();
        let kv = PagedKv {
            k: KvData::F32(&kv),
            v: KvData::F32(&kv),
            block_size: bs,
        };
        let mut out = vec![0f32; q.len()];
        let reps = 20;
        let t = Instant::now();
        for _ in 0..reps {
            paged_attention(&q, kv, &seqs, s, &mut out).unwrap();
        }
        println!(
            "attention {name} (one layer): {:.2} ms",
            t.elapsed().as_secs_f64() / reps as f64 * 1e3
        );
    }
}
