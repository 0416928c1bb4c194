//! GGML blocks laid out again in the engine's packed formats, without loss, so that
//! `--quant keep` reads them in place: Q8_0 → int8 group 32; Q5_0 → int8 group 32 (codes
//! `q − 16`); Q4_0 → symmetric int4 group 32; Q4_1 → int4 group 32 with offsets; Q4_K → int4
//! group 32 with offsets (each sub-block's `d·sc` and `−dmin·m`, the same f32 products the
//! reference dequantizer forms). Other types have no such form yet.

use crate::ggml::GgmlType;
use crate::ggml_blocks::{f16_at, q5, scale_min};
use crate::{PackedWeight, WeightFormat};

/// The packed format `ty` keeps its values in exactly, if it has one.
pub fn format_of(ty: GgmlType) -> Option<WeightFormat> {
    let int4 = |zero_point| WeightFormat::Int4 {
        group: 32,
        zero_point,
    };
    match ty {
        GgmlType::Q8_0 | GgmlType::Q5_0 => Some(WeightFormat::Int8 { group: 32 }),
        GgmlType::Q4_0 => Some(int4(false)),
        GgmlType::Q4_1 | GgmlType::Q4_K => Some(int4(true)),
        _ => None,
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
                // Sub-blocks 2j and 2j+1 share 32 bytes (low and high nibbles); a packed int4
                // group holds value i in the low nibble of byte i and value i+16 in its high one.
                let (bytes, shift) = (&qs[(sub / 2) * 32..][..32], 4 * (sub % 2));
                let v = |l: usize| (bytes[l] >> shift) & 0x0f;
                p.codes.extend((0..16).map(|i| v(i) | (v(i + 16) << 4)));
            }
        }
        _ => unreachable!("push_block is called for types with a packed format"),
    }
}

fn offsets(p: &mut PackedWeight) -> &mut Vec<f32> {
    p.offsets.get_or_insert_with(Vec::new)
}
