//! The per-request logits processors the API builds from `SamplingParams`: vLLM's `bad_words`,
//! and a chain that runs several (bad words under a grammar) as one.

use trtllm_executor::LogitsProcessor;

use crate::{Result, Tokenizer};

/// vLLM's `bad_words`: the last token of a word's token sequence is banned whenever the output
/// so far ends with the rest of it, so no completion ever spells the word that way. Each word is
/// tokenized as it is and after a space (as it appears mid-text).
pub(crate) struct BadWords {
    sequences: Vec<Vec<u32>>,
}

impl BadWords {
    pub fn new(tok: &Tokenizer, words: &[String]) -> Result<Self> {
        let mut sequences = Vec::new();
        for w in words {
            for text in [w.clone(), format!(" {w}")] {
                let ids = tok.encode(&text, false)?;
                if !ids.is_empty() && !sequences.contains(&ids) {
                    sequences.push(ids);
                }
            }
        }
        Ok(Self { sequences })
    }
}

impl LogitsProcessor for BadWords {
    fn process(&mut self, output: &[u32], logits: &mut [f32]) -> std::result::Result<(), String> {
        for seq in &self.sequences {
            let (last, prefix) = seq.split_last().expect("sequences are not empty");
            if output.ends_with(prefix) {
                if let Some(l) = logits.get_mut(*last as usize) {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
        Ok(())
    }

    fn accept(&mut self, _token: u32) -> std::result::Result<(), String> {
        Ok(())
    }
}

/// Several processors applied in order.
pub(crate) struct Chain(pub Vec<Box<dyn LogitsProcessor>>);

impl LogitsProcessor for Chain {
    fn prepare(&mut self, output: &[u32]) {
        self.0.iter_mut().for_each(|p| p.prepare(output));
    }

    fn process(&mut self, output: &[u32], logits: &mut [f32]) -> std::result::Result<(), String> {
        self.0
            .iter_mut()
            .try_for_each(|p| p.process(output, logits))
    }

    fn accept(&mut self, token: u32) -> std::result::Result<(), String> {
        self.0.iter_mut().try_for_each(|p| p.accept(token))
    }
}
