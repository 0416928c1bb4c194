//! Structured output: a grammar (a JSON schema, a regular expression, a Lark grammar, a list of
//! choices) limits each step's token to those that keep the output a prefix of the grammar's
//! language, through llguidance (the library behind guided decoding in vLLM, SGLang and
//! llama.cpp). The token trie is built once per tokenizer; each request gets its own matcher,
//! which runs as the request's [`LogitsProcessor`] in the engine loop.

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory};
use serde_json::Value;
use toktrie::{SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use trtllm_executor::LogitsProcessor;

use crate::{ApiError, Result, Tokenizer};

/// What the output must match.
#[derive(Clone, Debug, PartialEq)]
pub enum GuidedDecoding {
    /// A JSON value valid under this JSON schema.
    JsonSchema(Value),
    /// Any JSON object.
    JsonObject,
    /// A match of this regular expression (the whole output).
    Regex(String),
    /// A sentence of this Lark grammar (llguidance's dialect, which also reads GBNF-style rules).
    Grammar(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
}

impl GuidedDecoding {
    fn grammar(&self) -> TopLevelGrammar {
        match self {
            GuidedDecoding::JsonSchema(s) => TopLevelGrammar::from_json_schema(bounded_space(s)),
            GuidedDecoding::JsonObject => TopLevelGrammar::from_json_schema(bounded_space(
                &serde_json::json!({"type": "object"}),
            )),
            GuidedDecoding::Regex(r) => TopLevelGrammar::from_regex(r),
            GuidedDecoding::Grammar(g) => TopLevelGrammar::from_lark(g.clone()),
            GuidedDecoding::Choice(c) => {
                let alternatives: Vec<String> = c.iter().map(|s| regex_escape(s)).collect();
                TopLevelGrammar::from_regex(&alternatives.join("|"))
            }
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            GuidedDecoding::JsonSchema(_) => "JSON schema",
            GuidedDecoding::JsonObject => "JSON object",
            GuidedDecoding::Regex(_) => "regex",
            GuidedDecoding::Grammar(_) => "grammar",
            GuidedDecoding::Choice(_) => "choice",
        }
    }
}

/// The schema with at most 20 whitespace characters between JSON tokens (as llama.cpp's
/// schema grammars allow), unless it says otherwise in llguidance's `x-guidance` options:
/// unbounded whitespace lets a small model indent forever and never close the value.
fn bounded_space(schema: &Value) -> Value {
    let mut s = schema.clone();
    if let Some(o) = s.as_object_mut() {
        o.entry("x-guidance").or_insert_with(
            || serde_json::json!({"whitespace_pattern": "[\\x20\\x0A\\x0D\\x09]{1,20}"}),
        );
    }
    s
}

/// `s` as a regular expression that matches only itself.
fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.+*?()|[]{}^$#&-~".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The vocabulary as llguidance sees it: every token's bytes in a trie. Text is tokenized
/// greedily on the trie (llguidance needs it only to force tokens a grammar fixes).
struct Vocabulary {
    trie: TokTrie,
}

impl TokenizerEnv for Vocabulary {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.greedy_tokenize(s)
    }
}

/// Builds each request's grammar matcher; one per model, made on first use.
pub(crate) struct Guides {
    factory: ParserFactory,
    eos: Vec<u32>,
}

impl Guides {
    /// `vocab` is the model's (the logits' width, which may exceed the tokenizer's); `eos` its
    /// end-of-sequence ids, any of which ends a finished grammar.
    pub fn new(tok: &Tokenizer, vocab: usize, eos: &[u32]) -> Result<Self> {
        let first_eos = *eos.first().ok_or_else(|| {
            ApiError::InvalidInput("structured output needs an end-of-sequence token".into())
        })?;
        let words = tok.token_bytes(vocab, TokTrie::SPECIAL_TOKEN_MARKER)?;
        let info = TokRxInfo::new(vocab as u32, first_eos);
        let env: TokEnv = Arc::new(Vocabulary {
            trie: TokTrie::from(&info, &words),
        });
        let factory = ParserFactory::new_simple(&env)
            .map_err(|e| ApiError::InvalidInput(format!("structured output: {e}")))?;
        Ok(Self {
            factory,
            eos: eos.to_vec(),
        })
    }

    /// A matcher for one completion; an invalid schema, regex or grammar is an error naming the
    /// problem.
    pub fn guide(&self, g: &GuidedDecoding) -> Result<Guide> {
        let invalid = |e: String| ApiError::InvalidInput(format!("invalid {}: {e}", g.kind()));
        let parser = self
            .factory
            .create_parser(g.grammar())
            .map_err(|e| invalid(e.to_string()))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(invalid(e));
        }
        Ok(Guide {
            matcher,
            mask: None,
            eos: self.eos.clone(),
            first_eos: self.eos[0],
        })
    }
}

/// One completion's grammar state, applied as its logits processor.
pub(crate) struct Guide {
    matcher: Matcher,
    /// The next position's mask, computed while the model ran (`prepare`).
    mask: Option<std::result::Result<SimpleVob, String>>,
    eos: Vec<u32>,
    /// The end-of-sequence id the trie knows; the others follow it.
    first_eos: u32,
}

impl Guide {
    fn compute_mask(&mut self) -> std::result::Result<SimpleVob, String> {
        self.matcher
            .compute_mask_or_eos()
            .map_err(|e| e.to_string())
    }
}

impl LogitsProcessor for Guide {
    fn prepare(&mut self, _output: &[u32]) {
        self.mask = Some(self.compute_mask());
    }

    fn process(&mut self, _output: &[u32], logits: &mut [f32]) -> std::result::Result<(), String> {
        let mask = match self.mask.take() {
            Some(m) => m?,
            None => self.compute_mask()?,
        };
        // Every end-of-sequence id ends a finished grammar, not only the one the trie knows.
        let ends: Vec<(usize, f32)> = match mask.is_allowed(self.first_eos) {
            true => self
                .eos
                .iter()
                .filter_map(|&e| logits.get(e as usize).map(|&l| (e as usize, l)))
                .collect(),
            false => Vec::new(),
        };
        // Ids the mask does not cover (logits wider than the trie) are not allowed either.
        let covered = mask.len().min(logits.len());
        mask.iter_unset_entries(|id| {
            if id < covered {
                logits[id] = f32::NEG_INFINITY;
            }
        });
        logits[covered..].fill(f32::NEG_INFINITY);
        for (id, l) in ends {
            logits[id] = l;
        }
        Ok(())
    }

    fn accept(&mut self, token: u32) -> std::result::Result<(), String> {
        // The end of the output: nothing left for the grammar to read.
        if self.eos.contains(&token) {
            return Ok(());
        }
        self.matcher.consume_token(token).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::regex_escape;

    #[test]
    fn choices_are_matched_literally() {
        assert_eq!(regex_escape("a.b (c)|d"), "a\\.b \\(c\\)\\|d");
    }
}
