//! Activation functions of the MLP.

use rayon::prelude::*;

use crate::error::check_len;
use crate::Result;

/// Rows per parallel task; below two tasks' worth the rows run on the calling thread (the
/// pool's wake-up costs more than a decode row's activation).
const ROWS_PER_TASK: usize = 4;

/// Gated SiLU over a fused gate/up projection of `rows` rows, each laid out `gate ‖ up`
/// (`2·inter` values): `out[r][i] = silu(gate[r][i]) · up[r][i]`.
pub fn silu_mul(gate_up: &[f32], rows: usize, out: &mut [f32]) -> Result<()> {
    gated("silu_mul", gate_up, rows, out, |g| g / (1.0 + (-g).exp()))
}

/// Gated GELU-tanh (Gemma's GeGLU), laid out as [`silu_mul`]: `gelu_tanh(gate) · up`.
pub fn gelu_tanh_mul(gate_up: &[f32], rows: usize, out: &mut [f32]) -> Result<()> {
    gated("gelu_tanh_mul", gate_up, rows, out, gelu)
}

fn gated(
    op: &'static str,
    gate_up: &[f32],
    rows: usize,
    out: &mut [f32],
    act: impl Fn(f32) -> f32 + Sync,
) -> Result<()> {
    let inter = out.len() / rows.max(1);
    check_len(op, "out", out.len(), rows * inter)?;
    check_len(op, "gate_up", gate_up.len(), 2 * rows * inter)?;
    if inter == 0 {
        return Ok(());
    }
    let rows_of = |src: &[f32], dst: &mut [f32]| {
        for (src, dst) in src.chunks_exact(2 * inter).zip(dst.chunks_exact_mut(inter)) {
            let (g, u) = src.split_at(inter);
            for ((o, &g), &u) in dst.iter_mut().zip(g).zip(u) {
                *o = act(g) * u;
            }
        }
    };
    // In a batched step these run once per layer on a quarter-million values: serial, they left
    // the other core idle for ~7 ms of a 32-row SmolLM2 step.
    if rows < 2 * ROWS_PER_TASK {
        rows_of(gate_up, out);
    } else {
        gate_up
            .par_chunks(2 * inter * ROWS_PER_TASK)
            .zip(out.par_chunks_mut(inter * ROWS_PER_TASK))
            .for_each(|(src, dst)| rows_of(src, dst));
    }
    Ok(())
}

fn gelu(v: f32) -> f32 {
    const C: f32 = 0.797_884_6; // sqrt(2/pi)
    let t = (C * (v + 0.044715 * v * v * v)).tanh();
    0.5 * v * (1.0 + t)
}

/// GELU, tanh approximation (GPT-2's `gelu_new`), in place.
pub fn gelu_tanh(x: &mut [f32]) {
    for v in x.iter_mut() {
        *v = gelu(*v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::testutil::{assert_close, rand_vec};

    #[test]
    fn silu_mul_splits_each_row_into_gate_and_up() {
        // 3 rows run serially, 11 in tasks of `ROWS_PER_TASK` with a short last one.
        for rows in [3, 11] {
            silu_rows(rows);
        }
    }

    fn silu_rows(rows: usize) {
        let inter = 7;
        let gu = rand_vec(rows * 2 * inter, 4);
        let mut out = vec![0f32; rows * inter];
        silu_mul(&gu, rows, &mut out).unwrap();
        for r in 0..rows {
            for i in 0..inter {
                let g = gu[r * 2 * inter + i] as f64;
                let u = gu[r * 2 * inter + inter + i] as f64;
                let e = g / (1.0 + (-g).exp()) * u;
                assert_close(&[out[r * inter + i]], &[e as f32], 1e-6);
            }
        }
        assert!(silu_mul(&gu[1..], rows, &mut out).is_err());
    }

    #[test]
    fn gelu_tanh_mul_gates_the_up_half() {
        let gu = [1.0f32, -1.0, 2.0, 3.0];
        let mut out = [0f32; 2];
        gelu_tanh_mul(&gu, 1, &mut out).unwrap();
        assert_close(&out, &[0.841_192 * 2.0, -0.158_808 * 3.0], 1e-5);
    }

    #[test]
    fn gelu_tanh_known_values() {
        let mut x = [0.0f32, 1.0, -1.0, 3.0];
        gelu_tanh(&mut x);
        assert_close(&x, &[0.0, 0.841_192, -0.158_808, 2.996_363], 1e-5);
    }
}
