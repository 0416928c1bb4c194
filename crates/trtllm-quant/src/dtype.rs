//! Element types of stored weights.

use serde::{Deserialize, Serialize};
use trtllm_kernels::cpu::WeightData;

use crate::{QuantError, Result};

/// The element type a weight is stored in, spelled as in Hugging Face configs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DType {
    #[serde(rename = "float32")]
    F32,
    #[serde(rename = "bfloat16")]
    BF16,
    #[serde(rename = "float16")]
    F16,
    /// Raw bytes: packed quantized codes and NVFP4 block scales (see `WeightFormat`).
    #[serde(rename = "uint8")]
    U8,
}

impl DType {
    /// Parses the spellings used by configs and the CLI (`float32`, `bf16`, `torch.float16`, ...).
    pub fn parse(s: &str) -> Result<Self> {
        match s.trim_start_matches("torch.") {
            "float32" | "f32" | "fp32" | "float" => Ok(DType::F32),
            "bfloat16" | "bf16" => Ok(DType::BF16),
            "float16" | "f16" | "fp16" | "half" => Ok(DType::F16),
            other => Err(QuantError::UnknownDType(other.to_string())),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::BF16 => "bfloat16",
            DType::F16 => "float16",
            DType::U8 => "uint8",
        }
    }

    pub fn size_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::BF16 | DType::F16 => 2,
            DType::U8 => 1,
        }
    }

    /// Encodes f32 values into this type's little-endian bytes (round to nearest even).
    pub fn encode(self, values: &[f32]) -> Vec<u8> {
        match self {
            DType::F32 => bytemuck::cast_slice(values).to_vec(),
            DType::BF16 => {
                let v: Vec<u16> = values
                    .iter()
                    .map(|&x| half::bf16::from_f32(x).to_bits())
                    .collect();
                bytemuck::cast_slice(&v).to_vec()
            }
            DType::F16 => {
                let v: Vec<u16> = values
                    .iter()
                    .map(|&x| half::f16::from_f32(x).to_bits())
                    .collect();
                bytemuck::cast_slice(&v).to_vec()
            }
            DType::U8 => values.iter().map(|&x| x as u8).collect(),
        }
    }

    /// Decodes little-endian bytes of this type into f32 values (exact).
    pub fn decode(self, bytes: &[u8], what: &str) -> Result<Vec<f32>> {
        check_multiple(bytes.len(), self.size_bytes(), what)?;
        let halves = || {
            bytes
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
        };
        Ok(match self {
            DType::F32 => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            DType::BF16 => halves()
                .map(|b| half::bf16::from_bits(b).to_f32())
                .collect(),
            DType::F16 => halves().map(|b| half::f16::from_bits(b).to_f32()).collect(),
            DType::U8 => bytes.iter().map(|&b| b as f32).collect(),
        })
    }

    /// Views stored bytes as the slice the kernels read, without copying.
    pub fn view<'a>(self, bytes: &'a [u8], what: &str) -> Result<WeightData<'a>> {
        check_multiple(bytes.len(), self.size_bytes(), what)?;
        let misaligned = || QuantError::Misaligned {
            what: what.to_string(),
            align: self.size_bytes(),
        };
        Ok(match self {
            DType::F32 => {
                WeightData::F32(bytemuck::try_cast_slice(bytes).map_err(|_| misaligned())?)
            }
            DType::BF16 => {
                WeightData::Bf16(bytemuck::try_cast_slice(bytes).map_err(|_| misaligned())?)
            }
            DType::F16 => {
                WeightData::F16(bytemuck::try_cast_slice(bytes).map_err(|_| misaligned())?)
            }
            DType::U8 => {
                return Err(QuantError::Shape(format!(
                    "{what}: uint8 data is a packed format, not a float matrix"
                )))
            }
        })
    }
}

fn check_multiple(len: usize, size: usize, what: &str) -> Result<()> {
    if len.is_multiple_of(size) {
        Ok(())
    } else {
        Err(QuantError::ByteLength {
            what: what.to_string(),
            expected: len / size * size + size,
            got: len,
        })
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_decode_round_trips_and_rounds_to_nearest_even() {
        let v = [1.0f32, -2.5, 3.140625, 1.0 + 1.0 / 256.0];
        for d in [DType::F32, DType::BF16, DType::F16] {
            let back = d.decode(&d.encode(&v), "t").unwrap();
            assert_eq!(back[..3], v[..3], "{d}");
        }
        // 1 + 2^-8 is a tie between bf16 neighbours 1.0 and 1+2^-7: ties go to even (1.0).
        assert_eq!(
            DType::BF16.decode(&DType::BF16.encode(&v), "t").unwrap()[3],
            1.0
        );
    }

    #[test]
    fn parse_accepts_config_spellings() {
        assert_eq!(DType::parse("torch.bfloat16").unwrap(), DType::BF16);
        assert_eq!(DType::parse("fp16").unwrap(), DType::F16);
        assert!(DType::parse("int3").is_err());
        assert!(DType::F32.decode(&[0u8; 5], "w").is_err());
    }
}
