//! Dequantization of GGML's quantized blocks (4-, 5- and 8-bit, k-quants, IQ4), written from the reference
//! implementation in `gguf-py` (`gguf.quants`) with the same f32 operations in the same order,
//! so that values agree bit for bit (checked against it in `tests/fixtures/ggml`).
//!
//! A k-quant super-block holds 256 values in sub-blocks of 16 or 32, each with a small integer
//! scale (and min) multiplied by the super-block's f16 `d` (and `dmin`).

use half::f16;

/// Values per k-quant super-block.
pub const QK_K: usize = 256;

/// IQ4_NL's and IQ4_XS's non-linear 4-bit code book.
pub(crate) const IQ4_VALUES: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

pub(crate) fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

/// Q8_0: f16 `d` and 32 signed bytes; value `d·q`.
pub fn q8_0(b: &[u8], out: &mut Vec<f32>) {
    let d = f16_at(b, 0);
    out.extend(b[2..34].iter().map(|&q| d * (q as i8) as f32));
}

/// Q4_0: `d` and 16 bytes of nibbles (element `i` low, `i + 16` high); value `d·(q − 8)`.
pub fn q4_0(b: &[u8], out: &mut Vec<f32>) {
    let d = f16_at(b, 0);
    let qs = &b[2..18];
    out.extend(qs.iter().map(|&q| d * ((q & 0x0f) as i32 - 8) as f32));
    out.extend(qs.iter().map(|&q| d * ((q >> 4) as i32 - 8) as f32));
}

/// Q4_1: `d`, `m` and 16 bytes of nibbles; value `d·q + m`.
pub fn q4_1(b: &[u8], out: &mut Vec<f32>) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    let qs = &b[4..20];
    out.extend(qs.iter().map(|&q| d * (q & 0x0f) as f32 + m));
    out.extend(qs.iter().map(|&q| d * (q >> 4) as f32 + m));
}

/// The 5-bit code of element `j` of a Q5_0/Q5_1 block: low nibble from `qs`, fifth bit from `qh`.
pub(crate) fn q5(qs: &[u8], qh: u32, j: usize) -> u8 {
    let low = if j < 16 {
        qs[j] & 0x0f
    } else {
        qs[j - 16] >> 4
    };
    low | ((((qh >> j) & 1) as u8) << 4)
}

/// Q5_0: f16 `d`, 32 high bits, 16 bytes of nibbles; value `d·(q − 16)`.
pub fn q5_0(b: &[u8], out: &mut Vec<f32>) {
    let d = f16_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let qs = &b[6..22];
    out.extend((0..32).map(|j| d * (q5(qs, qh, j) as i8 - 16) as f32));
}

/// Q5_1: f16 `d` and `m`, 32 high bits, 16 bytes of nibbles; value `d·q + m`.
pub fn q5_1(b: &[u8], out: &mut Vec<f32>) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let qs = &b[8..24];
    out.extend((0..32).map(|j| d * q5(qs, qh, j) as f32 + m));
}

/// Q2_K: 16 scale bytes (low nibble scale, high nibble min), 64 bytes of 2-bit codes, `d`,
/// `dmin`; value `d·sc·q − dmin·m` per sub-block of 16.
pub fn q2_k(b: &[u8], out: &mut Vec<f32>) {
    for e in 0..QK_K {
        let (dl, ml) = q2_k_scale_min(b, e / 16);
        out.push(dl * q2_k_code(b, e) as f32 - ml);
    }
}

/// The 2-bit code of element `e` of a Q2_K block.
pub(crate) fn q2_k_code(b: &[u8], e: usize) -> u8 {
    let (half, shift, l) = (e / 128, (e % 128) / 32, e % 32);
    (b[16 + half * 32 + l] >> (2 * shift)) & 3
}

/// `d·sc` and `dmin·m` of sub-block `i` of a Q2_K block.
pub(crate) fn q2_k_scale_min(b: &[u8], i: usize) -> (f32, f32) {
    let s = b[i];
    let (d, dmin) = (f16_at(b, 80), f16_at(b, 82));
    (d * (s & 0x0f) as f32, dmin * (s >> 4) as f32)
}

/// Q3_K: 32 bytes of high-bit masks, 64 bytes of 2-bit codes, 12 bytes of 6-bit scales, `d`;
/// value `d·(sc − 32)·(q − 4·(1 − h))` per sub-block of 16.
pub fn q3_k(b: &[u8], out: &mut Vec<f32>) {
    for e in 0..QK_K {
        out.push(q3_k_scale(b, e / 16) * q3_k_code(b, e) as f32);
    }
}

/// The signed 3-bit code (−4..3) of element `e` of a Q3_K block.
pub(crate) fn q3_k_code(b: &[u8], e: usize) -> i8 {
    let (hmask, qs) = (&b[0..32], &b[32..96]);
    let (half, shift, l) = (e / 128, (e % 128) / 32, e % 32);
    let low = (qs[half * 32 + l] >> (2 * shift)) & 3;
    let h = ((hmask[l] >> (e / 32)) & 1) ^ 1;
    low as i8 - (h << 2) as i8
}

/// `d·(sc − 32)` of sub-block `i` of a Q3_K block.
pub(crate) fn q3_k_scale(b: &[u8], i: usize) -> f32 {
    let sc = &b[96..108];
    let low = if i < 8 { sc[i] & 0x0f } else { sc[i - 8] >> 4 };
    let high = (sc[8 + i % 4] >> (2 * (i / 4))) & 3;
    f16_at(b, 108) * ((low | (high << 4)) as i8 - 32) as f32
}

/// Q4_K's and Q5_K's 12 bytes of 6-bit scales and mins for 8 sub-blocks of 32.
pub(crate) fn scale_min(s: &[u8], i: usize) -> (u8, u8) {
    if i < 4 {
        (s[i] & 0x3f, s[4 + i] & 0x3f)
    } else {
        let j = i - 4;
        (
            (s[8 + j] & 0x0f) | ((s[j] >> 2) & 0x30),
            (s[8 + j] >> 4) | ((s[4 + j] >> 2) & 0x30),
        )
    }
}

/// Q4_K: `d`, `dmin`, 12 scale bytes, 128 bytes of nibbles; value `d·sc·q − dmin·m` per
/// sub-block of 32.
pub fn q4_k(b: &[u8], out: &mut Vec<f32>) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let (scales, qs) = (&b[4..16], &b[16..144]);
    for sub in 0..8 {
        let (sc, m) = scale_min(scales, sub);
        let (dl, ml) = (d * sc as f32, dmin * m as f32);
        let (bytes, shift) = (&qs[(sub / 2) * 32..][..32], 4 * (sub % 2));
        out.extend(
            bytes
                .iter()
                .map(|&q| dl * ((q >> shift) & 0x0f) as f32 - ml),
        );
    }
}

/// Q5_K: Q4_K with a fifth bit per value from 32 bytes of high bits.
pub fn q5_k(b: &[u8], out: &mut Vec<f32>) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    for sub in 0..8 {
        let (sc, m) = scale_min(&b[4..16], sub);
        let (dl, ml) = (d * sc as f32, dmin * m as f32);
        out.extend((0..32).map(|l| dl * q5_k_code(b, sub, l) as f32 - ml));
    }
}

/// The 5-bit code of element `l` of sub-block `sub` of a Q5_K block.
pub(crate) fn q5_k_code(b: &[u8], sub: usize, l: usize) -> u8 {
    let (qh, qs) = (&b[16..48], &b[48..176]);
    let q = qs[(sub / 2) * 32 + l] >> (4 * (sub % 2));
    (q & 0x0f) | (((qh[l] >> sub) & 1) << 4)
}

/// Q6_K: 128 bytes of low nibbles, 64 bytes of 2-bit highs, 16 signed scales, `d`; value
/// `d·sc·(q − 32)` per sub-block of 16.
pub fn q6_k(b: &[u8], out: &mut Vec<f32>) {
    for e in 0..QK_K {
        out.push(q6_k_scale(b, e / 16) * q6_k_code(b, e) as f32);
    }
}

/// The signed 6-bit code (−32..31) of element `e` of a Q6_K block.
pub(crate) fn q6_k_code(b: &[u8], e: usize) -> i8 {
    let (ql, qh) = (&b[0..128], &b[128..192]);
    let (half, rest) = (e / 128, e % 128);
    let low = (ql[half * 64 + rest % 64] >> (4 * (rest / 64))) & 0x0f;
    let high = (qh[half * 32 + rest % 32] >> (2 * (rest / 32))) & 3;
    (low | (high << 4)) as i8 - 32
}

/// `d·sc` of sub-block `i` of a Q6_K block.
pub(crate) fn q6_k_scale(b: &[u8], i: usize) -> f32 {
    f16_at(b, 208) * b[192 + i] as i8 as f32
}

/// IQ4_NL: `d` and 16 bytes of indices into the non-linear code book.
pub fn iq4_nl(b: &[u8], out: &mut Vec<f32>) {
    let d = f16_at(b, 0);
    let qs = &b[2..18];
    out.extend(
        qs.iter()
            .map(|&q| d * IQ4_VALUES[(q & 0x0f) as usize] as f32),
    );
    out.extend(qs.iter().map(|&q| d * IQ4_VALUES[(q >> 4) as usize] as f32));
}

/// IQ4_XS: `d`, 6-bit sub-block scales (2 high bits each in a u16, 4 low in nibbles), 128
/// bytes of code-book indices; value `d·(sc − 32)·kvalue` per sub-block of 32.
pub fn iq4_xs(b: &[u8], out: &mut Vec<f32>) {
    for sub in 0..8 {
        let dl = iq4_xs_scale(b, sub);
        let bytes = &b[8 + sub * 16..][..16];
        out.extend(
            bytes
                .iter()
                .map(|&q| dl * IQ4_VALUES[(q & 0x0f) as usize] as f32),
        );
        out.extend(
            bytes
                .iter()
                .map(|&q| dl * IQ4_VALUES[(q >> 4) as usize] as f32),
        );
    }
}

/// `d·(sc − 32)` of sub-block `sub` of an IQ4_XS block.
pub(crate) fn iq4_xs_scale(b: &[u8], sub: usize) -> f32 {
    let scales_h = u16::from_le_bytes([b[2], b[3]]);
    let low = (b[4 + sub / 2] >> (4 * (sub % 2))) & 0x0f;
    let high = ((scales_h >> (2 * sub)) as u8) & 3;
    f16_at(b, 0) * ((low | (high << 4)) as i8 - 32) as f32
}
