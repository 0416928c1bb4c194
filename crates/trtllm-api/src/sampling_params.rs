//! Per-request generation settings, validated before a request reaches the executor.

use trtllm_executor::runtime::{GenerationParams, SamplingConfig};

use crate::{ApiError, Result};

#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// 0 is greedy.
    pub temperature: f32,
    /// 0 disables.
    pub top_k: usize,
    /// In (0, 1]; 1 disables.
    pub top_p: f32,
    pub seed: Option<u64>,
    pub ignore_eos: bool,
    pub stop_token_ids: Vec<u32>,
    /// Leave special tokens (e.g. `<|im_end|>`) out of the returned text.
    pub skip_special_tokens: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            max_tokens: 16,
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: None,
            ignore_eos: false,
            stop_token_ids: Vec::new(),
            skip_special_tokens: true,
        }
    }
}

impl SamplingParams {
    /// Checks every field; the sampling ranges are the runtime's own (`SamplingConfig::validate`).
    pub fn validate(&self) -> Result<()> {
        if self.max_tokens == 0 {
            return Err(ApiError::InvalidParam {
                field: "max_tokens",
                value: "0".into(),
                expected: "at least 1",
            });
        }
        self.to_generation().sampling.validate()?;
        Ok(())
    }

    pub(crate) fn to_generation(&self) -> GenerationParams {
        GenerationParams {
            max_new_tokens: self.max_tokens,
            sampling: SamplingConfig {
                temperature: self.temperature,
                top_k: self.top_k,
                top_p: self.top_p,
                seed: self.seed,
            },
            ignore_eos: self.ignore_eos,
            stop_token_ids: self.stop_token_ids.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_range_values_name_the_field() {
        let p = SamplingParams {
            top_p: 1.5,
            ..Default::default()
        };
        let e = p.validate().unwrap_err().to_string();
        assert!(
            e.contains("top_p") && e.contains("1.5") && e.contains("(0, 1]"),
            "{e}"
        );
        assert!(SamplingParams {
            max_tokens: 0,
            ..Default::default()
        }
        .validate()
        .is_err());
        assert!(SamplingParams {
            temperature: -0.1,
            ..Default::default()
        }
        .validate()
        .is_err());
        assert!(SamplingParams::default().validate().is_ok());
    }
}
