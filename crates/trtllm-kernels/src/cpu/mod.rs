//! CPU kernels. Every public function validates its shapes, then dispatches on [`isa`]: to the
//! AVX-512 path where a kernel has one and the processor runs it, to the AVX2+FMA path, or to a
//! portable one.

mod activation;
mod attention;
mod attention_check;
mod attention_rows;
mod attention_tile;
mod elementwise;
mod gemm_direct;
mod gemm_packed;
#[cfg(test)]
mod invariance_tests;
mod lanes;
mod lora;
mod matmul;
mod norm;
pub(crate) mod quant;
mod rope;
mod rope_scaling;
mod simd;
mod tactic;
mod widen;

pub use activation::{gelu_tanh, gelu_tanh_mul, silu_mul};
#[cfg(feature = "cuda")]
pub(crate) use attention::{check_batch, PoolShape};
pub use attention::{
    paged_attention, paged_attention_with, AttentionPath, AttentionSeq, AttentionShape, KvData,
    PagedKv,
};
pub use elementwise::{add_inplace, embedding_gather, softmax_inplace};
pub use lora::{lora_add, LoraMat};
pub use matmul::{linear, linear_with, MatRef, WeightData};
pub use norm::{layer_norm, rms_norm};
pub use quant::{
    e4m3_to_f32, Fp8Weights, Int4Weights, Int8Weights, Nvfp4Weights, E2M1_VALUES, E4M3_MAX,
};
pub use rope::{apply_rope, RopeFreqs, RopeScaling, RopeTable};
pub use simd::{detected_isa, isa, limit_isa, simd_available, Isa};
pub use tactic::{Regime, Tactic, MAX_CHUNKS, MAX_PREFETCH};

#[cfg(test)]
pub(crate) mod testutil {
    use rand::{rngs::StdRng, Rng, SeedableRng};

    pub fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    /// `v` rounded to bf16, as raw bits.
    pub fn bf16_bits(v: &[f32]) -> Vec<u16> {
        v.iter()
            .map(|&x| half::bf16::from_f32(x).to_bits())
            .collect()
    }

    static PATH_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// Runs `f` once on every path this processor has (portable, AVX2, AVX-512); a path it
    /// lacks is named as skipped, with the features it needs, never passed silently.
    pub fn every_path(mut f: impl FnMut()) {
        use crate::cpu::{detected_isa, limit_isa, Isa};
        let _guard = PATH_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        for isa in Isa::ALL {
            if isa > detected_isa() {
                eprintln!(
                    "skipped the {} path: this CPU lacks {}",
                    isa.name(),
                    isa.features()
                );
                continue;
            }
            limit_isa(Some(isa));
            f();
        }
        limit_isa(None);
    }

    pub fn assert_close(a: &[f32], b: &[f32], tol: f32) {
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            let scale = 1.0f32.max(y.abs());
            assert!((x - y).abs() <= tol * scale, "index {i}: {x} vs {y}");
        }
    }
}
