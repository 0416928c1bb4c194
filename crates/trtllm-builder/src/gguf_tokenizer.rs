//! A GGUF file's tokenizer (byte-level BPE, `gpt2`, or SentencePiece, `llama`) written out as a
//! Hugging Face `tokenizer.json` + `tokenizer_config.json`, the same conversion transformers
//! applies, so the engine directory carries one tokenizer format whatever the checkpoint was.

use serde_json::{json, Map, Value as Json};

use crate::checkpoint::Checkpoint;
use crate::gguf::{GgufFile, Value};
use crate::gguf_spm::{self, Spm};
use crate::{BuildError, Result};

/// llama.cpp's token types: control tokens become special added tokens, user-defined ones
/// plain added tokens.
const CONTROL: u64 = 3;
const USER_DEFINED: u64 = 4;

/// `(tokenizer.json, tokenizer_config.json)`.
pub fn convert(gguf: &GgufFile) -> Result<(Json, Json)> {
    let path = crate::Checkpoint::path(gguf).to_path_buf();
    let model = gguf
        .get("tokenizer.ggml.model")
        .and_then(Value::as_str)
        .unwrap_or("");
    let strings = |key: &str| -> Result<Vec<String>> {
        let arr =
            gguf.get(key)
                .and_then(Value::as_array)
                .ok_or_else(|| BuildError::MissingField {
                    path: path.clone(),
                    field: key.into(),
                    arch: "a GGUF tokenizer".into(),
                })?;
        Ok(arr
            .iter()
            .map(|v| v.as_str().unwrap_or_default().to_string())
            .collect())
    };
    let tokens = strings("tokenizer.ggml.tokens")?;
    let types: Vec<u64> = gguf
        .get("tokenizer.ggml.token_type")
        .and_then(Value::as_array)
        .map(|a| a.iter().map(|v| v.as_u64().unwrap_or(1)).collect())
        .unwrap_or_default();
    let token_id = |k: &str| {
        gguf.get(&format!("tokenizer.ggml.{k}"))
            .and_then(Value::as_u64)
            .map(|v| v as usize)
    };
    let name_of = |id: Option<usize>| id.and_then(|i| tokens.get(i)).cloned();

    let alphabet = byte_alphabet();
    let (parts, byte_level) = match model {
        "gpt2" => {
            let merges = strings("tokenizer.ggml.merges")?;
            let mut parts = byte_level_parts(&tokens, merges, &alphabet);
            let pre = gguf.get("tokenizer.ggml.pre").and_then(Value::as_str);
            if let Some(split) = pre.and_then(pre_split) {
                parts.pre_tokenizer = split;
            } else if let Some(pre) = pre.filter(|p| !GPT2_SPLIT.contains(p)) {
                tracing::warn!(
                    "{}: tokenizer.ggml.pre {pre:?} is not a pre-tokenizer we know; splitting \
                     text as GPT-2 does (as transformers does), so token ids may differ from \
                     llama.cpp's",
                    gguf.path().display()
                );
            }
            (parts, true)
        }
        "llama" => {
            let scores: Vec<f32> = gguf
                .get("tokenizer.ggml.scores")
                .and_then(Value::as_array)
                .map(|a| a.iter().map(|v| v.as_f64().unwrap_or(0.0) as f32).collect())
                .unwrap_or_default();
            let arch = gguf.get("general.architecture").and_then(Value::as_str);
            let gemma = matches!(arch, Some("gemma" | "gemma2" | "gemma3"));
            let unk = name_of(token_id("unknown_token_id"));
            let spm = gguf_spm::sentencepiece(&tokens, &scores, unk.as_deref(), gemma);
            (spm, false)
        }
        other => {
            return Err(BuildError::checkpoint(
                &path,
                format!(
                    "tokenizer.ggml.model '{other}' is not supported (gpt2: byte-level BPE; \
                     llama: SentencePiece)"
                ),
            ))
        }
    };
    // Control tokens stay whole as special tokens, user-defined ones the vocabulary spells as
    // plain added tokens (as transformers adds them); in a byte-level vocabulary a control token
    // spelled outside the byte alphabet is a converter's mislabel and is left out.
    let added: Vec<Json> = tokens
        .iter()
        .enumerate()
        .filter_map(|(i, t)| {
            let special = match types.get(i) {
                Some(&CONTROL) if !byte_level || in_alphabet(&alphabet, t) => true,
                Some(&USER_DEFINED) if parts.model["vocab"].get(t.as_str()).is_some() => false,
                _ => return None,
            };
            Some(
                json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                        "rstrip": false, "normalized": false, "special": special}),
            )
        })
        .collect();
    let bos = name_of(token_id("bos_token_id"));
    let eos = name_of(token_id("eos_token_id"));
    let add_bos = matches!(
        gguf.get("tokenizer.ggml.add_bos_token"),
        Some(Value::Bool(true))
    );
    let post = match (&bos, add_bos) {
        (Some(b), true) => json!({
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": b, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {b: {"id": b, "ids": [token_id("bos_token_id")], "tokens": [b]}}
        }),
        _ if byte_level => json!({"type": "ByteLevel", "add_prefix_space": false,
                                  "trim_offsets": false, "use_regex": true}),
        _ => Json::Null,
    };
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": parts.normalizer,
        "pre_tokenizer": parts.pre_tokenizer,
        "post_processor": post,
        "decoder": parts.decoder,
        "model": parts.model,
    });
    let mut config =
        json!({"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": add_bos});
    if let Some(b) = bos {
        config["bos_token"] = json!(b);
    }
    if let Some(e) = eos {
        config["eos_token"] = json!(e);
    }
    if let Some(t) = gguf.get("tokenizer.chat_template").and_then(Value::as_str) {
        config["chat_template"] = json!(t);
    }
    Ok((tokenizer, config))
}

/// `tokenizer.ggml.pre` names whose split is GPT-2's, in llama.cpp and transformers alike (or
/// that transformers reads as GPT-2's: SmolLM's, whose ids it is the reference for).
const GPT2_SPLIT: &[&str] = &[
    "default",
    "gpt2",
    "gpt-2",
    "phi-2",
    "smollm",
    "roberta-bpe",
    "gigachat",
    "jina-es",
    "jina-de",
    "jina-v1-en",
    "jina-v2-es",
    "jina-v2-de",
    "jina-v2-code",
];

/// The text split a byte-level vocabulary's merges were learned on, by `tokenizer.ggml.pre`, for
/// the names transformers maps to their own (the reference for ids); any other name keeps GPT-2's
/// split, as transformers keeps it.
fn pre_split(pre: &str) -> Option<Json> {
    const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN35: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const TEKKEN: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const GPT4O: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    let regex = match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" | "jina-v5-nano" | "dbrx" | "smaug-bpe" => LLAMA3,
        "tekken" => TEKKEN,
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" => QWEN2,
        "qwen35" => QWEN35,
        "gpt-4o" | "llama4" | "kanana2" | "talkie" | "minimax-m2" => GPT4O,
        _ => return None,
    };
    Some(json!({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false},
        {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}
    ]}))
}

/// A byte-level BPE vocabulary and the file's merges, with GPT-2's pre-tokenizer and decoder.
fn byte_level_parts(tokens: &[String], merges: Vec<String>, alphabet: &[char]) -> Spm {
    let mut vocab = Map::new();
    for (i, t) in tokens.iter().enumerate() {
        // A token whose bytes llama.cpp could not spell byte-level comes back raw; respell it the
        // way the merges refer to it.
        let key = if in_alphabet(alphabet, t) {
            t.clone()
        } else {
            t.bytes().map(|b| alphabet[b as usize]).collect()
        };
        vocab.insert(key, json!(i));
    }
    Spm {
        model: json!({"type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": "", "end_of_word_suffix": "", "fuse_unk": false,
            "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": merges}),
        normalizer: Json::Null,
        pre_tokenizer: json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
            "use_regex": true}),
        decoder: json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
            "use_regex": true}),
    }
}

/// Whether `t` is spelled in the byte-level alphabet.
fn in_alphabet(alphabet: &[char], t: &str) -> bool {
    t.chars().all(|c| alphabet.contains(&c))
}

/// GPT-2's byte → printable character table.
pub fn byte_alphabet() -> Vec<char> {
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut extra = 0;
    (0u32..256)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).expect("latin-1")
            } else {
                extra += 1;
                char::from_u32(255 + extra).expect("valid code point")
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::byte_alphabet;

    #[test]
    fn byte_alphabet_matches_gpt2() {
        let a = byte_alphabet();
        assert_eq!(a[b' ' as usize], 'Ġ');
        assert_eq!(a[b'\n' as usize], 'Ċ');
        assert_eq!(a[b'A' as usize], 'A');
        assert_eq!(a.len(), 256);
    }
}
