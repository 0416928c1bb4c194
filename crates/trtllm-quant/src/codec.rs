//! Rounding f32 values to the small float codes: FP8 E4M3 and FP4 E2M1. Decoding lives in the
//! kernels (`e4m3_to_f32`, `E2M1_VALUES`); encoding rounds to the nearest code, ties to the
//! even code, saturating at the largest finite value.

use std::sync::OnceLock;

use trtllm_kernels::cpu::{e4m3_to_f32, E2M1_VALUES, E4M3_MAX};

/// Nearest code among `codes` (ascending non-negative values with their code), ties to even.
fn nearest(table: &[(f32, u8)], a: f32) -> u8 {
    let i = table.partition_point(|&(v, _)| v < a);
    if i == 0 {
        return table[0].1;
    }
    if i == table.len() {
        return table[i - 1].1;
    }
    let (lo, hi) = (table[i - 1], table[i]);
    let (dl, dh) = (a - lo.0, hi.0 - a);
    if dl < dh || (dl == dh && lo.1 % 2 == 0) {
        lo.1
    } else {
        hi.1
    }
}

/// Rounds activations through FP8 with a static per-tensor `scale` (quantize, dequantize),
/// as an FP8 GEMM sees them.
pub fn fp8_qdq(x: &mut [f32], scale: f32) {
    for v in x {
        *v = e4m3_to_f32(f32_to_e4m3(*v / scale)) * scale;
    }
}

/// f32 → FP8 E4M3 (saturating; NaN becomes 0). Rounds the f32 mantissa to 3 bits with ties to
/// even in the integer domain (a carry moves into the exponent by itself); below 2⁻⁶ the codes
/// are the subnormal multiples of 2⁻⁹.
pub fn f32_to_e4m3(x: f32) -> u8 {
    if x.is_nan() {
        return 0;
    }
    let sign = ((x.to_bits() >> 24) & 0x80) as u8;
    let a = x.abs();
    if a >= E4M3_MAX {
        return sign | 0x7e;
    }
    if a < 1.0 / 64.0 {
        // Exact: scaling by a power of two; 8 · 2⁻⁹ is code 0x08, the smallest normal.
        return sign | (a * 512.0).round_ties_even() as u8;
    }
    let bits = a.to_bits();
    let r = (bits + 0x7_ffff + ((bits >> 20) & 1)) >> 20;
    let exp = (r >> 3) + 7 - 127;
    sign | ((exp << 3) | (r & 7)) as u8
}

/// f32 → FP4 E2M1 code (saturating at ±6).
pub fn f32_to_e2m1(x: f32) -> u8 {
    static T: OnceLock<Vec<(f32, u8)>> = OnceLock::new();
    let t = T.get_or_init(|| (0u8..8).map(|c| (E2M1_VALUES[c as usize], c)).collect());
    if x.is_nan() {
        return 0;
    }
    let sign = if x.is_sign_negative() { 8 } else { 0 };
    sign | nearest(t, x.abs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e4m3_round_trips_every_code_and_rounds_ties_to_even() {
        for c in (0u8..0x7f).chain(0x80..0xff) {
            let v = e4m3_to_f32(c);
            let back = f32_to_e4m3(v);
            assert!(back == c || (v == 0.0 && back & 0x7f == 0), "{c:#x}");
        }
        // 1.0 (0x38) and 1.125 (0x39): 1.0625 is a tie, goes to the even code.
        assert_eq!(f32_to_e4m3(1.0625), 0x38);
        assert_eq!(f32_to_e4m3(1.07), 0x39);
        assert_eq!(f32_to_e4m3(1e6), 0x7e);
        assert_eq!(f32_to_e4m3(-1e6), 0xfe);
        assert_eq!(f32_to_e4m3(f32::INFINITY), 0x7e);
    }

    #[test]
    fn e4m3_encoder_is_the_nearest_code_everywhere() {
        // 0x7f is NaN in E4M3fn; every other non-negative code is finite and they ascend.
        let table: Vec<(f32, u8)> = (0u8..0x7f).map(|c| (e4m3_to_f32(c), c)).collect();
        // Every 97th f32 from 0 to 512, both signs: subnormals, every binade, saturation.
        for bits in (0..0x4400_0000u32).step_by(97) {
            for x in [f32::from_bits(bits), -f32::from_bits(bits)] {
                let want = ((x.to_bits() >> 24) & 0x80) as u8 | nearest(&table, x.abs());
                assert_eq!(f32_to_e4m3(x), want, "{x:e}");
            }
        }
    }

    #[test]
    fn e2m1_rounds_to_nearest() {
        assert_eq!(E2M1_VALUES[f32_to_e2m1(2.4) as usize], 2.0);
        assert_eq!(E2M1_VALUES[f32_to_e2m1(-5.1) as usize], -6.0);
        assert_eq!(E2M1_VALUES[f32_to_e2m1(100.0) as usize], 6.0);
        // 2.5 is a tie between 2 (code 4) and 3 (code 5): even code wins.
        assert_eq!(f32_to_e2m1(2.5), 4);
    }
}
