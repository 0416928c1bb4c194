//! GGML tensor element types as GGUF files store them, and their exact dequantization.
//!
//! Block layouts (little-endian): Q8_0 = f16 scale `d` + 32 × i8, value `d·q`;
//! Q4_0 = `d` + 16 bytes of nibbles, value `d·(q−8)`; Q4_1 = `d`, `m` + 16 bytes, value `d·q + m`.
//! Byte `i` of a 4-bit block holds element `i` in its low nibble and element `i+16` in its high one.
//! Every block layout's dequantizer is in `ggml_blocks`. Products and sums are separate f32
//! operations (no fused multiply-add), matching the reference dequantizer bit for bit.

use half::f16;

use crate::ggml_blocks as blocks;
use crate::ggml_pack as pack;
use crate::{PackedWeight, QuantError, Result};

/// The GGML element types this engine imports.
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    IQ4_NL,
    IQ4_XS,
}

/// Every GGML type id and its name, as ggml numbers them (ids 4 and 5 are retired).
const NAMES: &[(u32, &str)] = &[
    (0, "F32"),
    (1, "F16"),
    (2, "Q4_0"),
    (3, "Q4_1"),
    (6, "Q5_0"),
    (7, "Q5_1"),
    (8, "Q8_0"),
    (9, "Q8_1"),
    (10, "Q2_K"),
    (11, "Q3_K"),
    (12, "Q4_K"),
    (13, "Q5_K"),
    (14, "Q6_K"),
    (15, "Q8_K"),
    (16, "IQ2_XXS"),
    (17, "IQ2_XS"),
    (18, "IQ3_XXS"),
    (19, "IQ1_S"),
    (20, "IQ4_NL"),
    (21, "IQ3_S"),
    (22, "IQ2_S"),
    (23, "IQ4_XS"),
    (24, "I8"),
    (25, "I16"),
    (26, "I32"),
    (27, "I64"),
    (28, "F64"),
    (29, "IQ1_M"),
    (30, "BF16"),
    (34, "TQ1_0"),
    (35, "TQ2_0"),
    (39, "MXFP4"),
    (40, "NVFP4"),
];

pub const SUPPORTED_GGML: &str =
    "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS";

impl GgmlType {
    pub fn from_id(id: u32) -> Result<Self> {
        use GgmlType::*;
        Ok(match id {
            0 => F32,
            1 => F16,
            2 => Q4_0,
            3 => Q4_1,
            6 => Q5_0,
            7 => Q5_1,
            8 => Q8_0,
            10 => Q2_K,
            11 => Q3_K,
            12 => Q4_K,
            13 => Q5_K,
            14 => Q6_K,
            20 => IQ4_NL,
            23 => IQ4_XS,
            30 => BF16,
            other => {
                let name = NAMES.iter().find(|(i, _)| *i == other).map(|(_, n)| *n);
                return Err(QuantError::UnsupportedGgmlType {
                    name: name.map_or_else(|| format!("with id {other}"), str::to_string),
                    supported: SUPPORTED_GGML,
                });
            }
        })
    }

    /// Elements per block.
    pub fn block_elems(self) -> usize {
        use GgmlType::*;
        match self {
            F32 | F16 | BF16 => 1,
            Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | IQ4_NL => 32,
            Q2_K | Q3_K | Q4_K | Q5_K | Q6_K | IQ4_XS => blocks::QK_K,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        use GgmlType::*;
        match self {
            F32 => 4,
            F16 | BF16 => 2,
            Q4_0 | IQ4_NL => 18,
            Q4_1 => 20,
            Q5_0 => 22,
            Q5_1 => 24,
            Q8_0 => 34,
            Q2_K => 84,
            Q3_K => 110,
            Q4_K => 144,
            Q5_K => 176,
            Q6_K => 210,
            IQ4_XS => 136,
        }
    }

    /// Bytes that `elements` values occupy.
    pub fn byte_len(self, elements: usize) -> Result<usize> {
        let block = self.block_elems();
        if !elements.is_multiple_of(block) {
            return Err(QuantError::PartialBlock { elements, block });
        }
        Ok(elements / block * self.block_bytes())
    }

    /// Dequantizes `elements` values from `bytes` to f32.
    pub fn dequantize(self, bytes: &[u8], elements: usize) -> Result<Vec<f32>> {
        let expected = self.byte_len(elements)?;
        if bytes.len() != expected {
            return Err(QuantError::ByteLength {
                what: format!("GGML {self:?} tensor"),
                expected,
                got: bytes.len(),
            });
        }
        let mut out = Vec::with_capacity(elements);
        use GgmlType::*;
        let block: fn(&[u8], &mut Vec<f32>) = match self {
            F32 => {
                let f = |c: &[u8]| f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                out.extend(bytes.chunks_exact(4).map(f));
                return Ok(out);
            }
            F16 => {
                let f = |c: &[u8]| f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
                out.extend(bytes.chunks_exact(2).map(f));
                return Ok(out);
            }
            BF16 => {
                let f = |c: &[u8]| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
                out.extend(bytes.chunks_exact(2).map(f));
                return Ok(out);
            }
            Q4_0 => blocks::q4_0,
            Q4_1 => blocks::q4_1,
            Q5_0 => blocks::q5_0,
            Q5_1 => blocks::q5_1,
            Q8_0 => blocks::q8_0,
            Q2_K => blocks::q2_k,
            Q3_K => blocks::q3_k,
            Q4_K => blocks::q4_k,
            Q5_K => blocks::q5_k,
            Q6_K => blocks::q6_k,
            IQ4_NL => blocks::iq4_nl,
            IQ4_XS => blocks::iq4_xs,
        };
        for b in bytes.chunks_exact(self.block_bytes()) {
            block(b, &mut out);
        }
        Ok(out)
    }
}

impl GgmlType {
    /// The same values in the engine's native packed format, without loss (see `ggml_pack`);
    /// None for the float types. `bytes` hold a
    /// `rows × cols` matrix, row by row.
    pub fn to_packed(self, bytes: &[u8], rows: usize, cols: usize) -> Result<Option<PackedWeight>> {
        let Some(format) = pack::format_of(self) else {
            return Ok(None);
        };
        let expected = self.byte_len(rows * cols)?;
        if bytes.len() != expected || !cols.is_multiple_of(self.block_elems()) {
            return Err(QuantError::ByteLength {
                what: format!("GGML {self:?} matrix {rows}×{cols}"),
                expected,
                got: bytes.len(),
            });
        }
        let mut p = PackedWeight::empty(format, rows, cols);
        for b in bytes.chunks_exact(self.block_bytes()) {
            pack::push_block(self, b, &mut p);
        }
        Ok(Some(p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(x: f32) -> [u8; 2] {
        f16::from_f32(x).to_bits().to_le_bytes()
    }

    #[test]
    fn q4_1_block_layout() {
        let mut b = Vec::new();
        b.extend(h(0.5));
        b.extend(h(-1.0));
        b.extend((0..16u8).map(|i| i | ((15 - i) << 4)));
        let v = GgmlType::Q4_1.dequantize(&b, 32).unwrap();
        assert_eq!(v[0], -1.0);
        assert_eq!(v[3], 0.5 * 3.0 - 1.0);
        assert_eq!(v[16], 0.5 * 15.0 - 1.0);
        assert_eq!(v[31], -1.0);
    }

    #[test]
    fn q4_0_and_q8_0_blocks() {
        let mut b = Vec::new();
        b.extend(h(2.0));
        b.extend([0x8fu8; 16]);
        let v = GgmlType::Q4_0.dequantize(&b, 32).unwrap();
        assert_eq!((v[0], v[16]), (14.0, 0.0));
        let mut b = Vec::new();
        b.extend(h(0.25));
        b.extend((0..32).map(|i| (i as i8 - 16) as u8));
        let v = GgmlType::Q8_0.dequantize(&b, 32).unwrap();
        assert_eq!((v[0], v[31]), (-4.0, 3.75));
    }

    /// Packed imports stand for exactly the values the reference dequantizer produces.
    #[test]
    fn packed_import_is_lossless() {
        let mut q41 = Vec::new();
        let mut q40 = Vec::new();
        let mut q80 = Vec::new();
        for blk in 0..4u8 {
            q41.extend(h(0.25 + blk as f32));
            q41.extend(h(-1.5));
            q41.extend((0..16u8).map(|i| i.wrapping_mul(7 + blk)));
            q40.extend(h(0.5 - blk as f32));
            q40.extend((0..16u8).map(|i| i.wrapping_mul(11 + blk)));
            q80.extend(h(0.125 * (blk + 1) as f32));
            q80.extend((0..32u8).map(|i| i.wrapping_mul(37 + blk)));
        }
        for (ty, bytes) in [
            (GgmlType::Q4_1, q41),
            (GgmlType::Q4_0, q40),
            (GgmlType::Q8_0, q80),
        ] {
            let reference = ty.dequantize(&bytes, 128).unwrap();
            let packed = ty.to_packed(&bytes, 2, 64).unwrap().unwrap();
            assert_eq!(packed.dequantize().unwrap(), reference, "{ty:?}");
        }
        assert!(GgmlType::F16.to_packed(&[0; 4], 1, 2).unwrap().is_none());
    }

    #[test]
    fn bad_sizes_and_types_are_errors() {
        assert!(GgmlType::Q8_0.dequantize(&[0u8; 33], 32).is_err());
        assert!(GgmlType::Q4_0.byte_len(31).is_err());
        assert!(GgmlType::from_id(16).is_err());
    }
}
