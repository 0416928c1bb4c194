//! Quantized weight matrices as the kernels read them: packed codes plus their scales, never a
//! dequantized copy. Rows are `[out_features]`, each row `cols` (in_features) values long.
//!
//! Every format is a sequence of fixed blocks per row (`BLOCK` values: 32, or 16 for NVFP4);
//! a row's value is `code · scale (+ offset)` with the scale looked up per block. Scalar
//! dequantization ([`QuantRows::row_to_f32`]) is the definition; the AVX2 paths in [`gemv`]
//! must agree with it up to float summation order.

pub(crate) mod gemv;
pub(crate) mod gemv_table;
pub(crate) mod w8a8;

use crate::error::check_len;
use crate::{KernelError, Result};

/// Values of an FP4 E2M1 code (bit 3 is the sign).
pub const E2M1_VALUES: [f32; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];

/// Largest finite FP8 E4M3 value (the `fn` variant: no infinities, 0x7f/0xff are NaN).
pub const E4M3_MAX: f32 = 448.0;

/// Decodes an FP8 E4M3 byte. The E4M3 bit pattern shifted into an f16 is the same number times
/// 2⁻⁸, subnormals included, which is also how the AVX2 path widens eight at a time.
#[inline]
pub fn e4m3_to_f32(b: u8) -> f32 {
    f16_bits_of_e4m3(b).to_f32() * 256.0
}

#[inline]
fn f16_bits_of_e4m3(b: u8) -> half::f16 {
    let sign = ((b & 0x80) as u16) << 8;
    half::f16::from_bits(sign | (((b & 0x7f) as u16) << 7))
}

/// Signed 8-bit codes with one f32 scale per `group` values of a row (`group == cols`:
/// per channel; 16 or a multiple of 32). A value is `scale · q`, plus the group's offset where
/// there are `offsets` (GGML's Q5_1 and Q5_K, kept). `scales` and `offsets` are
/// `[rows × ceil(cols / group)]`.
#[derive(Clone, Copy, Debug)]
pub struct Int8Weights<'a> {
    pub q: &'a [i8],
    pub scales: &'a [f32],
    pub offsets: Option<&'a [f32]>,
    pub group: usize,
}

/// Unsigned 4-bit codes, two per byte: in each 32-value block, byte `i` holds value `i` in its
/// low nibble and value `i + 16` in its high one (the GGML layout). A value is
/// `scale · q + offset`; without `offsets` the code is symmetric, `scale · (q − 8)`. A group
/// is 16 values (the low or high nibbles of a block: GGML's Q2_K) or a multiple of 32.
#[derive(Clone, Copy, Debug)]
pub struct Int4Weights<'a> {
    pub q: &'a [u8],
    pub scales: &'a [f32],
    pub offsets: Option<&'a [f32]>,
    pub group: usize,
}

/// FP8 E4M3 codes with one f32 scale per row.
#[derive(Clone, Copy, Debug)]
pub struct Fp8Weights<'a> {
    pub q: &'a [u8],
    pub scales: &'a [f32],
}

/// NVFP4: E2M1 codes two per byte (per 16-value block, byte `i` holds value `i` low and `i + 8`
/// high), one E4M3 scale per 16 values, and one f32 global scale.
#[derive(Clone, Copy, Debug)]
pub struct Nvfp4Weights<'a> {
    pub q: &'a [u8],
    pub block_scales: &'a [u8],
    pub global_scale: f32,
}

/// Shape checks and scalar access shared by every quantized format.
pub(crate) trait QuantRows: Sync {
    /// Values per block.
    const BLOCK: usize;
    /// Checks the slices against a `rows × cols` matrix.
    fn check(&self, rows: usize, cols: usize) -> Result<()>;
    /// Row `r` of a `cols`-wide matrix, dequantized.
    fn row_to_f32(&self, r: usize, cols: usize, out: &mut [f32]);
}

pub(crate) fn check_blocks(op: &'static str, cols: usize, block: usize) -> Result<()> {
    if cols.is_multiple_of(block) {
        Ok(())
    } else {
        Err(KernelError::ShapeMismatch {
            op,
            what: "columns (a multiple of the block size)",
            expected: cols.next_multiple_of(block),
            got: cols,
        })
    }
}

/// Group sizes the int8/int4 kernels take: 16 (half a 32-value block, as GGML's k-quants with
/// 16-value sub-blocks) or a whole number of blocks.
pub(crate) fn check_group(op: &'static str, group: usize) -> Result<()> {
    if group == 16 || (group > 0 && group.is_multiple_of(32)) {
        Ok(())
    } else {
        Err(KernelError::ShapeMismatch {
            op,
            what: "group size (16 or a positive multiple of 32)",
            expected: group.next_multiple_of(32).max(32),
            got: group,
        })
    }
}

/// Groups per row: the last may be shorter than `group`.
pub(crate) fn groups(cols: usize, group: usize) -> usize {
    cols.div_ceil(group)
}

impl QuantRows for Int8Weights<'_> {
    const BLOCK: usize = 32;
    fn check(&self, rows: usize, cols: usize) -> Result<()> {
        check_blocks("int8 weights", cols, Self::BLOCK)?;
        check_group("int8 weights", self.group)?;
        check_len("int8 weights", "codes", self.q.len(), rows * cols)?;
        let n = rows * groups(cols, self.group);
        check_len("int8 weights", "scales", self.scales.len(), n)?;
        match self.offsets {
            Some(o) => check_len("int8 weights", "offsets", o.len(), n),
            None => Ok(()),
        }
    }
    fn row_to_f32(&self, r: usize, cols: usize, out: &mut [f32]) {
        let g = groups(cols, self.group);
        let q = &self.q[r * cols..(r + 1) * cols];
        for (c, (o, &v)) in out.iter_mut().zip(q).enumerate() {
            let gi = r * g + c / self.group;
            let scaled = v as f32 * self.scales[gi];
            *o = match self.offsets {
                Some(off) => scaled + off[gi],
                None => scaled,
            };
        }
    }
}

impl QuantRows for Int4Weights<'_> {
    const BLOCK: usize = 32;
    fn check(&self, rows: usize, cols: usize) -> Result<()> {
        check_blocks("int4 weights", cols, Self::BLOCK)?;
        check_group("int4 weights", self.group)?;
        check_len("int4 weights", "codes", self.q.len(), rows * cols / 2)?;
        let n = rows * groups(cols, self.group);
        check_len("int4 weights", "scales", self.scales.len(), n)?;
        match self.offsets {
            Some(o) => check_len("int4 weights", "offsets", o.len(), n),
            None => Ok(()),
        }
    }
    fn row_to_f32(&self, r: usize, cols: usize, out: &mut [f32]) {
        let g = groups(cols, self.group);
        let row = &self.q[r * cols / 2..(r + 1) * cols / 2];
        for (b, bytes) in row.chunks_exact(16).enumerate() {
            for (i, &byte) in bytes.iter().enumerate() {
                for (c, code) in [(b * 32 + i, byte & 0x0f), (b * 32 + i + 16, byte >> 4)] {
                    let gi = r * g + c / self.group;
                    let s = self.scales[gi];
                    out[c] = match self.offsets {
                        Some(o) => s * code as f32 + o[gi],
                        None => s * (code as i32 - 8) as f32,
                    };
                }
            }
        }
    }
}

impl QuantRows for Fp8Weights<'_> {
    const BLOCK: usize = 32;
    fn check(&self, rows: usize, cols: usize) -> Result<()> {
        check_blocks("fp8 weights", cols, Self::BLOCK)?;
        check_len("fp8 weights", "codes", self.q.len(), rows * cols)?;
        check_len("fp8 weights", "scales", self.scales.len(), rows)
    }
    fn row_to_f32(&self, r: usize, cols: usize, out: &mut [f32]) {
        let s = self.scales[r];
        for (o, &b) in out.iter_mut().zip(&self.q[r * cols..(r + 1) * cols]) {
            *o = e4m3_to_f32(b) * s;
        }
    }
}

impl QuantRows for Nvfp4Weights<'_> {
    const BLOCK: usize = 16;
    fn check(&self, rows: usize, cols: usize) -> Result<()> {
        check_blocks("nvfp4 weights", cols, Self::BLOCK)?;
        check_len("nvfp4 weights", "codes", self.q.len(), rows * cols / 2)?;
        check_len(
            "nvfp4 weights",
            "block scales",
            self.block_scales.len(),
            rows * cols / 16,
        )
    }
    fn row_to_f32(&self, r: usize, cols: usize, out: &mut [f32]) {
        let row = &self.q[r * cols / 2..(r + 1) * cols / 2];
        for (b, bytes) in row.chunks_exact(8).enumerate() {
            let s = e4m3_to_f32(self.block_scales[r * cols / 16 + b]) * self.global_scale;
            for (i, &byte) in bytes.iter().enumerate() {
                out[b * 16 + i] = E2M1_VALUES[(byte & 0x0f) as usize] * s;
                out[b * 16 + i + 8] = E2M1_VALUES[(byte >> 4) as usize] * s;
            }
        }
    }
}

#[cfg(test)]
mod tests;
