//! The machine's read bandwidth, the ceiling of memory-bound decode: every thread of the pool
//! sums its share of a buffer far larger than the caches; best of 5 passes, in GB/s.
//! `cargo run --release -p trtllm-kernels --example read_bandwidth [MiB]` (default 1024).
use std::time::Instant;

use rayon::prelude::*;

fn main() {
    let mib: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1024);
    let buf: Vec<f32> = (0..mib << 18).map(|i| (i & 255) as f32).collect();
    let chunk = buf.len().div_ceil(rayon::current_num_threads() * 8);
    let mut best = f64::MAX;
    let mut check = 0f32;
    for _ in 0..5 {
        let t = Instant::now();
        check += buf
            .par_chunks(chunk)
            // Sixteen independent partial sums, so the adds vectorise and do not wait on each other.
            .map(|c| {
                let mut acc = [0f32; 16];
                for v in c.chunks_exact(16) {
                    for (a, x) in acc.iter_mut().zip(v) {
                        *a += x;
                    }
                }
                acc.iter().sum::<f32>()
            })
            .sum::<f32>();
        best = best.min(t.elapsed().as_secs_f64());
    }
    let gbs = (buf.len() * 4) as f64 / best / 1e9;
    println!("{gbs:.2}");
    eprintln!(
        "read bandwidth: {gbs:.2} GB/s over {mib} MiB, {} threads (checksum {check})",
        rayon::current_num_threads()
    );
}
