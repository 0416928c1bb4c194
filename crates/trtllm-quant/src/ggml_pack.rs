//! GGML blocks laid out again in the engine's packed formats, without loss, so that
//! `--quant keep` reads them in place. Each group's scale (and offset) is the same f32 product
//! the reference dequantizer forms (`d·sc`, `−dmin·m`), so a kept value is bit for bit the
//! dequantized one:
//!
//! | GGML | packed as | codes |
//! | --- | --- | --- |
//! | Q8_0 | int8 g32 | as stored |
//! | Q5_0 | int8 g32 | `q − 16` |
//! | Q5_1, Q5_K | int8 g32, offsets | `q` (0..31) |
//! | Q6_K | int8 g16 | `q − 32` |
//! | Q3_K | int8 g16 | −4..3 |
//! | IQ4_NL, IQ4_XS | int8 g32 | the code book's values |
//! | Q4_0 | int4 g32, symmetric | as stored |
//! | Q4_1, Q4_K | int4 g32, offsets | as stored |
//! | Q2_K | int4 g16, offsets | `q` (0..3) |
//!
//! The 5- and 6-bit types and IQ4 take 8 bits per value kept (their own layouts are not what
//! the kernels read); every type keeps its groups and scales.

use crate::ggml::GgmlType;
use crate::ggml_blocks::{self as blocks, f16_at, q5, scale_min, IQ4_VALUES, QK_K};
use crate::{PackedWeight, WeightFormat};

/// The packed format `ty` keeps its values in exactly, if it has one.
pub fn format_of(ty: GgmlType) -> Option<WeightFormat> {
    use GgmlType::*;
    let int8 = |group, zero_point| WeightFormat::Int8 { group, zero_point };
    let int4 = |group, zero_point| WeightFormat::Int4 { group, zero_point };
    match ty {
        Q8_0 | Q5_0 | IQ4_NL | IQ4_XS => Some(int8(32, false)),
        Q5_1 | Q5_K => Some(int8(32, true)),
        Q6_K | Q3_K => Some(int8(16, false)),
        Q4_0 => Some(int4(32, false)),
        Q4_1 | Q4_K => Some(int4(32, true)),
        Q2_K => Some(int4(16, true)),
        F32 | F16 | BF16 => None,
    }
}

/// Appends block `b` of type `ty` (one with a [`format_of`]) to `p`.
pub fn push_block(ty: GgmlType, b: &[u8], p: &mut PackedWeight) {
    match ty {
        GgmlType::Q8_0 => {
            p.scales.push(f16_at(b, 0));
            p.codes.extend_from_slice(&b[2..34]);
        }
        GgmlType::Q5_0 => {
            p.scales.push(f16_at(b, 0));
            let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
            let qs = &b[6..22];
            p.codes
                .extend((0..32).map(|j| (q5(qs, qh, j) as i8 - 16) as u8));
        }
        GgmlType::Q4_0 => {
            p.scales.push(f16_at(b, 0));
            p.codes.extend_from_slice(&b[2..18]);
        }
        GgmlType::Q4_1 => {
            p.scales.push(f16_at(b, 0));
            offsets(p).push(f16_at(b, 2));
            p.codes.extend_from_slice(&b[4..20]);
        }
        GgmlType::Q4_K => {
            let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
            let (scales, qs) = (&b[4..16], &b[16..144]);
            for sub in 0..8 {
                let (sc, m) = scale_min(scales, sub);
                p.scales.push(d * sc as f32);
                offsets(p).push(-(dmin * m as f32));
                // Sub-blocks 2j and 2j+1 share 32 bytes (low and high nibbles).
                let (bytes, shift) = (&qs[(sub / 2) * 32..][..32], 4 * (sub % 2));
                p.push_int4_block(|l| (bytes[l] >> shift) & 0x0f);
            }
        }
        GgmlType::Q5_1 => {
            p.scales.push(f16_at(b, 0));
            offsets(p).push(f16_at(b, 2));
            let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
            p.codes.extend((0..32).map(|j| q5(&b[8..24], qh, j)));
        }
        GgmlType::Q5_K => {
            let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
            for sub in 0..8 {
                let (sc, m) = scale_min(&b[4..16], sub);
                p.scales.push(d * sc as f32);
                offsets(p).push(-(dmin * m as f32));
                p.codes
                    .extend((0..32).map(|l| blocks::q5_k_code(b, sub, l)));
            }
        }
        GgmlType::Q6_K => {
            p.scales.extend((0..16).map(|i| blocks::q6_k_scale(b, i)));
            p.codes
                .extend((0..QK_K).map(|e| blocks::q6_k_code(b, e) as u8));
        }
        GgmlType::Q3_K => {
            p.scales.extend((0..16).map(|i| blocks::q3_k_scale(b, i)));
            p.codes
                .extend((0..QK_K).map(|e| blocks::q3_k_code(b, e) as u8));
        }
        GgmlType::Q2_K => {
            for i in 0..16 {
                let (dl, ml) = blocks::q2_k_scale_min(b, i);
                p.scales.push(dl);
                offsets(p).push(-ml);
            }
            for block in 0..QK_K / 32 {
                p.push_int4_block(|l| blocks::q2_k_code(b, block * 32 + l));
            }
        }
        GgmlType::IQ4_NL => {
            p.scales.push(f16_at(b, 0));
            push_iq4(&b[2..18], p);
        }
        GgmlType::IQ4_XS => {
            for sub in 0..8 {
                p.scales.push(blocks::iq4_xs_scale(b, sub));
                push_iq4(&b[8 + sub * 16..][..16], p);
            }
        }
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => {
            unreachable!("push_block is called for types with a packed format")
        }
    }
}

/// 32 code-book values from 16 bytes of indices (value `i` low, `i + 16` high).
fn push_iq4(qs: &[u8], p: &mut PackedWeight) {
    let value = |i: u8| IQ4_VALUES[i as usize] as u8;
    p.codes.extend(qs.iter().map(|&q| value(q & 0x0f)));
    p.codes.extend(qs.iter().map(|&q| value(q >> 4)));
}

fn offsets(p: &mut PackedWeight) -> &mut Vec<f32> {
    p.offsets.get_or_insert_with(Vec::new)
}
