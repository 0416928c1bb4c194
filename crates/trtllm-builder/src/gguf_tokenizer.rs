//! A GGUF file's byte-level BPE tokenizer (`tokenizer.ggml.model = "gpt2"`) written out as a
//! Hugging Face `tokenizer.json` + `tokenizer_config.json`, the same conversion transformers
//! applies, so the engine directory carries one tokenizer format whatever the checkpoint was.

use serde_json::{json, Map, Value as Json};

use crate::gguf::{GgufFile, Value};
use crate::{BuildError, Result};

/// llama.cpp's token type for control tokens; these become special added tokens.
const CONTROL: u64 = 3;

/// `(tokenizer.json, tokenizer_config.json)`.
pub fn convert(gguf: &GgufFile) -> Result<(Json, Json)> {
    let path = crate::Checkpoint::path(gguf).to_path_buf();
    let model = gguf
        .get("tokenizer.ggml.model")
        .and_then(Value::as_str)
        .unwrap_or("");
    if model != "gpt2" {
        return Err(BuildError::checkpoint(
            &path,
            format!(
                "tokenizer.ggml.model '{model}' is not supported (only byte-level BPE, 'gpt2')"
            ),
        ));
    }
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
    let merges = strings("tokenizer.ggml.merges")?;
    let types: Vec<u64> = gguf
        .get("tokenizer.ggml.token_type")
        .and_then(Value::as_array)
        .map(|a| a.iter().map(|v| v.as_u64().unwrap_or(1)).collect())
        .unwrap_or_default();

    let alphabet = byte_alphabet();
    let in_alphabet = |t: &str| t.chars().all(|c| alphabet.contains(&c));
    let mut vocab = Map::new();
    for (i, t) in tokens.iter().enumerate() {
        // A token whose bytes llama.cpp could not spell byte-level comes back raw; respell it the
        // way the merges refer to it.
        let key = if in_alphabet(t) {
            t.clone()
        } else {
            t.bytes().map(|b| alphabet[b as usize]).collect()
        };
        vocab.insert(key, json!(i));
    }
    let added: Vec<Json> = tokens
        .iter()
        .enumerate()
        .filter(|(i, t)| types.get(*i) == Some(&CONTROL) && in_alphabet(t))
        .map(|(i, t)| {
            json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": true})
        })
        .collect();

    let token_id = |k: &str| {
        gguf.get(&format!("tokenizer.ggml.{k}"))
            .and_then(Value::as_u64)
            .map(|v| v as usize)
    };
    let name_of = |id: Option<usize>| id.and_then(|i| tokens.get(i)).cloned();
    let bos = name_of(token_id("bos_token_id"));
    let eos = name_of(token_id("eos_token_id"));
    let add_bos = matches!(
        gguf.get("tokenizer.ggml.add_bos_token"),
        Some(Value::Bool(true))
    );
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": true});
    let post = match (&bos, add_bos) {
        (Some(b), true) => json!({
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": b, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {b: {"id": b, "ids": [token_id("bos_token_id")], "tokens": [b]}}
        }),
        _ => byte_level.clone(),
    };
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": merges}
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

/// GPT-2's byte → printable character table.
fn byte_alphabet() -> Vec<char> {
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
