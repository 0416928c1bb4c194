//! Incremental detokenisation: text as tokens arrive, in constant work per token, never
//! splitting a UTF-8 character.

use crate::{Result, Tokenizer};

/// Decodes a short window of recent tokens rather than the whole output each time (vLLM's
/// prefix/read offsets). The window's start is decoded twice — alone and with the new tokens —
/// so decoders that treat a sequence's first token specially (SentencePiece's leading space)
/// affect both sides alike and the difference is exactly the new text. A byte-level token can
/// end mid-character: the decoded window then ends in U+FFFD and nothing is emitted until a
/// later token completes the character.
pub(crate) struct IncrementalDecoder {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
    skip_special_tokens: bool,
}

impl IncrementalDecoder {
    pub fn new(skip_special_tokens: bool) -> Self {
        Self {
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
            skip_special_tokens,
        }
    }

    /// The text `ids` complete; `finished` also flushes an incomplete character.
    pub fn push(&mut self, tok: &Tokenizer, ids: &[u32], finished: bool) -> Result<String> {
        self.ids.extend_from_slice(ids);
        let skip = self.skip_special_tokens;
        let prefix = tok.decode(&self.ids[self.prefix_offset..self.read_offset], skip)?;
        let full = tok.decode(&self.ids[self.prefix_offset..], skip)?;
        if full.len() <= prefix.len() || (!finished && full.ends_with('\u{fffd}')) {
            return Ok(String::new());
        }
        let new = match full.get(prefix.len()..) {
            Some(s) if full.starts_with(&prefix) => s.to_string(),
            // The window's text changed under the new tokens (a normaliser merged across the
            // boundary): wait for more context rather than emit text that may be wrong.
            _ if !finished => return Ok(String::new()),
            _ => full.chars().skip(prefix.chars().count()).collect(),
        };
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(new)
    }
}
