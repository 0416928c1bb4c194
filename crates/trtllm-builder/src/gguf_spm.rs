//! A GGUF SentencePiece vocabulary (`tokenizer.ggml.model = "llama"`) as a Hugging Face BPE
//! tokenizer with byte fallback, built the way transformers builds it from the same file (the
//! reference for token ids): merges recovered from the vocabulary, best first — by the token's
//! score, or for Gemma by its position in the file, since Gemma's scores do not follow its merge
//! order — and Gemma's or Llama's handling of spaces.

use std::collections::HashMap;

use serde_json::{json, Value as Json};

/// The parts of `tokenizer.json` that depend on the vocabulary's flavor.
pub struct Spm {
    pub model: Json,
    pub normalizer: Json,
    pub pre_tokenizer: Json,
    pub decoder: Json,
}

/// `tokens` and `scores` as the file lists them; `gemma` picks Gemma's flavor (spaces replaced by
/// `▁` in the normalizer, no prefix space); otherwise Llama's (`▁` prepended to the first word,
/// as transformers' LlamaTokenizer does whatever the file's `add_space_prefix` says).
pub fn sentencepiece(tokens: &[String], scores: &[f32], unk: Option<&str>, gemma: bool) -> Spm {
    // Gemma files store a token of several spaces as real spaces; its merges spell them `▁`.
    let tokens: Vec<String> = match gemma {
        true => tokens.iter().map(|t| respell_spaces(t)).collect(),
        false => tokens.to_vec(),
    };
    let mut vocab: HashMap<&str, usize> = HashMap::with_capacity(tokens.len());
    // Keys in first-seen order, each with its last score: a Python dict built the same way.
    let mut order: Vec<&str> = Vec::with_capacity(tokens.len());
    let mut score: HashMap<&str, f64> = HashMap::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        if vocab.insert(t, i).is_none() {
            order.push(t);
        }
        let s = match gemma {
            true => -(i as f64),
            false => scores.get(i).copied().unwrap_or(0.0) as f64,
        };
        score.insert(t, s);
    }
    let merges = recover_merges(&order, &vocab, &score);
    let vocab_json: serde_json::Map<String, Json> = vocab
        .iter()
        .map(|(t, &i)| (t.to_string(), json!(i)))
        .collect();
    let model = json!({"type": "BPE", "dropout": null, "unk_token": unk,
        "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": true,
        "byte_fallback": true, "ignore_merges": false, "vocab": vocab_json, "merges": merges});
    let base_decoder = vec![
        json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if gemma {
        return Spm {
            model,
            normalizer: json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}),
            pre_tokenizer: json!({"type": "Split", "pattern": {"String": " "},
                "behavior": "MergedWithPrevious", "invert": false}),
            decoder: json!({"type": "Sequence", "decoders": base_decoder}),
        };
    }
    let mut decoders = base_decoder;
    decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    Spm {
        model,
        normalizer: Json::Null,
        pre_tokenizer: json!({"type": "Metaspace", "replacement": "\u{2581}",
            "prepend_scheme": "first", "split": false}),
        decoder: json!({"type": "Sequence", "decoders": decoders}),
    }
}

/// A whitespace-only token with a space in it, spelled with `▁` as the merges see it.
fn respell_spaces(t: &str) -> String {
    if t.contains(' ') && t.trim().is_empty() {
        "\u{2581}".repeat(t.chars().count())
    } else {
        t.to_string()
    }
}

/// Every split of a token into two vocabulary tokens is a merge ranked by the token's score
/// (ties: longer left part, then longer right part, first; then vocabulary order), as
/// transformers' `generate_merges` ranks them.
fn recover_merges(
    order: &[&str],
    vocab: &HashMap<&str, usize>,
    score: &HashMap<&str, f64>,
) -> Vec<[String; 2]> {
    let mut merges: Vec<(&str, &str, f64)> = Vec::new();
    for &token in order {
        let s = score[token];
        let mut local: Vec<(&str, &str, f64)> = token
            .char_indices()
            .skip(1)
            .map(|(at, _)| token.split_at(at))
            .filter(|(l, r)| vocab.contains_key(l) && vocab.contains_key(r))
            .map(|(l, r)| (l, r, s))
            .collect();
        local.sort_by_key(|(l, r, _)| (vocab[l], vocab[r]));
        merges.extend(local);
    }
    let key = |(l, r, s): &(&str, &str, f64)| (*s, l.chars().count(), r.chars().count());
    // Stable and descending, like Python's sorted(..., reverse=True).
    merges.sort_by(|a, b| {
        let (ka, kb) = (key(a), key(b));
        kb.0.total_cmp(&ka.0)
            .then(kb.1.cmp(&ka.1))
            .then(kb.2.cmp(&ka.2))
    });
    merges
        .into_iter()
        .map(|(l, r, _)| [l.to_string(), r.to_string()])
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn merges_follow_scores_then_lengths() {
        let tokens = toks(&["a", "b", "ab", "abb", "bb"]);
        let spm = sentencepiece(&tokens, &[0.0, 0.0, -1.0, -2.0, -3.0], None, false);
        let merges: Vec<Vec<String>> = serde_json::from_value(spm.model["merges"].clone()).unwrap();
        let want = [["a", "b"], ["ab", "b"], ["a", "bb"], ["b", "b"]];
        let got: Vec<[&str; 2]> = merges
            .iter()
            .map(|m| [m[0].as_str(), m[1].as_str()])
            .collect();
        assert_eq!(got, want);
        assert_eq!(spm.pre_tokenizer["prepend_scheme"], "first");
    }

    #[test]
    fn gemma_ranks_by_file_order_and_spells_runs_of_spaces() {
        let tokens = toks(&["\u{2581}", "  ", "x", "xx"]);
        let spm = sentencepiece(&tokens, &[0.0; 4], Some("<unk>"), true);
        assert_eq!(spm.model["vocab"]["\u{2581}\u{2581}"], 1);
        let merges: Vec<Vec<String>> = serde_json::from_value(spm.model["merges"].clone()).unwrap();
        assert_eq!(merges[0], ["\u{2581}", "\u{2581}"]);
        assert_eq!(merges[1], ["x", "x"]);
        assert_eq!(spm.normalizer["type"], "Replace");
    }
}
