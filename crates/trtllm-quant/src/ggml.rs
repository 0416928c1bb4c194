//! GGML tensor element types as GGUF files store them, and their exact dequantization.
//!
//! Block layouts (little-endian): Q8_0 = f16 scale `d` + 32 × i8, value `d·q`;
//! Q4_0 = `d` + 16 bytes of nibbles, value `d·(q−8)`; Q4_1 = `d`, `m` + 16 bytes, value `d·q + m`.
//! Byte `i` of a 4-bit block holds element `i` in its low nibble and element `i+16` in its high one.
//! Products and sums are separate f32 operations (no fused multiply-add), matching the reference
//! dequantizer bit for bit.

use half::f16;

use crate::{PackedWeight, QuantError, Result, WeightFormat};

/// The GGML element types this engine imports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q8_0,
}

impl GgmlType {
    pub fn from_id(id: u32) -> Result<Self> {
        Ok(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            8 => GgmlType::Q8_0,
            30 => GgmlType::BF16,
            other => return Err(QuantError::UnsupportedGgmlType(other)),
        })
    }

    /// Elements per block.
    pub fn block_elems(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0 => 32,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q4_0 => 18,
            GgmlType::Q4_1 => 20,
            GgmlType::Q8_0 => 34,
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
        let scale =
            |b: &[u8], at: usize| f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32();
        match self {
            GgmlType::F32 => out.extend(
                bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            ),
            GgmlType::F16 => out.extend(bytes.chunks_exact(2).map(|c| scale(c, 0))),
            GgmlType::BF16 => out.extend(
                bytes
                    .chunks_exact(2)
                    .map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32()),
            ),
            GgmlType::Q8_0 => {
                for b in bytes.chunks_exact(34) {
                    let d = scale(b, 0);
                    out.extend(b[2..].iter().map(|&q| d * (q as i8) as f32));
                }
            }
            GgmlType::Q4_0 => {
                for b in bytes.chunks_exact(18) {
                    let d = scale(b, 0);
                    let qs = &b[2..];
                    out.extend(qs.iter().map(|&q| d * ((q & 0x0f) as i32 - 8) as f32));
                    out.extend(qs.iter().map(|&q| d * ((q >> 4) as i32 - 8) as f32));
                }
            }
            GgmlType::Q4_1 => {
                for b in bytes.chunks_exact(20) {
                    let (d, m) = (scale(b, 0), scale(b, 2));
                    let qs = &b[4..];
                    out.extend(qs.iter().map(|&q| d * (q & 0x0f) as f32 + m));
                    out.extend(qs.iter().map(|&q| d * (q >> 4) as f32 + m));
                }
            }
        }
        Ok(out)
    }
}

impl GgmlType {
    /// The same values in the engine's native packed format, without loss: Q8_0 → int8 group
    /// 32, Q4_0 → symmetric int4 group 32, Q4_1 → int4 group 32 with zero point. None for the
    /// float types. `bytes` hold a `rows × cols` matrix, row by row.
    pub fn to_packed(self, bytes: &[u8], rows: usize, cols: usize) -> Result<Option<PackedWeight>> {
        let format = match self {
            GgmlType::Q8_0 => WeightFormat::Int8 { group: 32 },
            GgmlType::Q4_0 => WeightFormat::Int4 {
                group: 32,
                zero_point: false,
            },
            GgmlType::Q4_1 => WeightFormat::Int4 {
                group: 32,
                zero_point: true,
            },
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => return Ok(None),
        };
        let expected = self.byte_len(rows * cols)?;
        if bytes.len() != expected || !cols.is_multiple_of(32) {
            return Err(QuantError::ByteLength {
                what: format!("GGML {self:?} matrix {rows}×{cols}"),
                expected,
                got: bytes.len(),
            });
        }
        let blocks = rows * cols / 32;
        let scale =
            |b: &[u8], at: usize| f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32();
        let mut p = PackedWeight {
            format,
            rows,
            cols,
            codes: Vec::with_capacity(rows * format.code_bytes(cols)),
            scales: Vec::with_capacity(blocks),
            offsets: (self == GgmlType::Q4_1).then(|| Vec::with_capacity(blocks)),
            block_scales: Vec::new(),
            global_scale: 1.0,
        };
        for b in bytes.chunks_exact(self.block_bytes()) {
            p.scales.push(scale(b, 0));
            match (self, p.offsets.as_mut()) {
                (GgmlType::Q4_1, Some(o)) => {
                    o.push(scale(b, 2));
                    p.codes.extend_from_slice(&b[4..]);
                }
                _ => p.codes.extend_from_slice(&b[2..]),
            }
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
        assert!(GgmlType::from_id(12).is_err());
    }
}
