//! `cargo run --release -p trtllm-kernels --example lora_bench [ROWS [ADAPTERS]]`: `cpu::lora_add` over
//! SmolLM2's four adapted modules of all 30 layers (fused q/k/v and gate/up as the runtime
//! places them), rank-16 adapters on every projection, the rows split evenly over the adapters:
//! the time of one step's LoRA updates and its GFLOP/s. `FLUSH=1` streams a layer's worth of
//! base weights between layers, as a real pass does. `DEVICE=cuda` (built with `--features cuda`)
//! times `CudaDevice::lora_add` instead, on GPU 0.

use std::time::Instant;

use trtllm_kernels::cpu::{lora_add, LoraMat};
use trtllm_kernels::{LoraBlock, LoraDims};

const RANK: usize = 16;
const LAYERS: usize = 30;

/// (inputs, output widths of the fused projections) of qkv, o, gate/up and down.
const MODULES: [(usize, &[usize]); 4] = [
    (576, &[576, 192, 192]),
    (576, &[576]),
    (576, &[1536, 1536]),
    (1536, &[576]),
];

struct Factors {
    a: Vec<f32>,
    bt: Vec<f32>,
    rank: usize,
    blocks: Vec<LoraBlock>,
}

fn factors(inputs: usize, parts: &[usize], seed: usize) -> Factors {
    let rank = RANK * parts.len();
    let outputs: usize = parts.iter().sum();
    let mut blocks = Vec::new();
    let mut at = 0;
    for (p, &w) in parts.iter().enumerate() {
        blocks.push(LoraBlock {
            outputs: at..at + w,
            ranks: p * RANK..(p + 1) * RANK,
        });
        at += w;
    }
    let v = |n: usize, k: usize| (0..n).map(|i| ((i * 7 + k) % 13) as f32 * 1e-3).collect();
    Factors {
        a: v(rank * inputs, seed),
        bt: v(rank * outputs, seed + 1),
        rank,
        blocks,
    }
}

#[cfg(feature = "cuda")]
mod gpu {
    use std::time::Instant;

    use trtllm_kernels::cuda::CudaDevice;
    use trtllm_kernels::LoraDims;

    use super::{Factors, LAYERS, MODULES};

    pub fn run(
        all: &[Vec<Vec<Factors>>],
        rows: usize,
        segments: &[(std::ops::Range<usize>, usize)],
        flops: usize,
    ) {
        let d = CudaDevice::new(0).expect("a CUDA device");
        let dims = |m: usize| LoraDims {
            inputs: MODULES[m].0,
            outputs: MODULES[m].1.iter().sum(),
        };
        let mats: Vec<Vec<Vec<_>>> = all
            .iter()
            .map(|layer| {
                (layer.iter().enumerate())
                    .map(|(m, slots)| {
                        (slots.iter())
                            .map(|f| {
                                d.lora_mat((&f.a, &f.bt), f.rank, &f.blocks, dims(m))
                                    .expect("upload")
                            })
                            .collect()
                    })
                    .collect()
            })
            .collect();
        let adapters = all[0][0].len();
        let pass = d.lora_rows(segments, rows, adapters).expect("rows");
        let xs: Vec<_> = (0..MODULES.len())
            .map(|m| d.upload(&vec![0.5f32; rows * dims(m).inputs]).expect("x"))
            .collect();
        let mut ys: Vec<_> = (0..MODULES.len())
            .map(|m| d.zeros::<f32>(rows * dims(m).outputs).expect("y"))
            .collect();
        let mut best = f64::MAX;
        for _ in 0..20 {
            d.synchronize().expect("sync");
            let t = Instant::now();
            for layer in &mats {
                for (m, slots) in layer.iter().enumerate() {
                    let slots: Vec<_> = slots.iter().map(Some).collect();
                    d.lora_add(&xs[m], &mut ys[m], &pass, &slots)
                        .expect("lora_add");
                }
            }
            d.synchronize().expect("sync");
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!(
            "{} ({rows} rows, {adapters} adapters, {LAYERS} layers): {:.3} ms per step, {:.1} GFLOP/s",
            d.name(),
            best * 1e3,
            flops as f64 / best / 1e9
        );
    }
}

#[cfg(not(feature = "cuda"))]
mod gpu {
    pub fn run(
        _: &[Vec<Vec<super::Factors>>],
        _: usize,
        _: &[(std::ops::Range<usize>, usize)],
        _: usize,
    ) {
        eprintln!("DEVICE=cuda needs --features cuda");
    }
}

fn main() {
    let arg = |i: usize, default: usize| {
        std::env::args()
            .nth(i)
            .and_then(|a| a.parse().ok())
            .unwrap_or(default)
    };
    let (rows, adapters) = (arg(1, 32), arg(2, 4));
    // A layer's base weights (18 MB of f32 for SmolLM2) stream between its LoRA updates.
    let flush = std::env::var_os("FLUSH").is_some();
    let mut weights = vec![1.0f32; 18 << 18];
    // Every layer and adapter has its own factors, so a step streams them as the runtime does.
    let all: Vec<Vec<Vec<Factors>>> = (0..LAYERS)
        .map(|l| {
            MODULES
                .iter()
                .map(|(i, p)| (0..adapters).map(|s| factors(*i, p, l * 8 + s)).collect())
                .collect()
        })
        .collect();
    let per = rows.div_ceil(adapters);
    let segments: Vec<_> = (0..adapters)
        .map(|s| (s * per..((s + 1) * per).min(rows), s))
        .filter(|(r, _)| !r.is_empty())
        .collect();
    let flops: usize = MODULES
        .iter()
        .map(|(i, p)| 2 * rows * RANK * p.len() * i + 2 * rows * RANK * p.iter().sum::<usize>())
        .sum::<usize>()
        * LAYERS;
    if std::env::var("DEVICE").is_ok_and(|d| d == "cuda") {
        return gpu::run(&all, rows, &segments, flops);
    }
    let xs: Vec<Vec<f32>> = MODULES.iter().map(|(i, _)| vec![0.5; rows * i]).collect();
    let mut ys: Vec<Vec<f32>> = MODULES
        .iter()
        .map(|(_, p)| vec![0.0; rows * p.iter().sum::<usize>()])
        .collect();
    let mut best = f64::MAX;
    for _ in 0..20 {
        let mut took = 0.0;
        for layer in &all {
            if flush {
                weights.iter_mut().for_each(|w| *w *= 1.000001);
            }
            let t = Instant::now();
            for (m, slots) in layer.iter().enumerate() {
                let dims = LoraDims {
                    inputs: MODULES[m].0,
                    outputs: MODULES[m].1.iter().sum(),
                };
                let mats: Vec<_> = slots
                    .iter()
                    .map(|f| {
                        Some(LoraMat {
                            a: &f.a,
                            bt: &f.bt,
                            rank: f.rank,
                            blocks: &f.blocks,
                        })
                    })
                    .collect();
                lora_add(&xs[m], &mut ys[m], dims, &segments, &mats).expect("shapes");
            }
            took += t.elapsed().as_secs_f64();
        }
        best = best.min(took);
    }
    println!(
        "{rows} rows, {adapters} rank-{RANK} adapters, {LAYERS} layers{}: {:.2} ms per step, {:.1} GFLOP/s ({} threads)",
        if flush { ", 18 MB streamed per layer" } else { "" },
        best * 1e3,
        flops as f64 / best / 1e9,
        rayon::current_num_threads()
    );
}
