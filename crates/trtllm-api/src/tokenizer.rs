//! The engine directory's tokenizer (`tokenizer.json` through the `tokenizers` crate) with its
//! special tokens and chat template from `tokenizer_config.json` / `chat_template.jinja`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde_json::Value;

use crate::chat::{ChatMessage, ChatOptions, ChatTemplate, SpecialTokens};
use crate::{ApiError, Result};

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos_token: Option<String>,
    eos_token: Option<String>,
    chat_template: Option<ChatTemplate>,
    path: PathBuf,
    /// The tokenizer that reads special-token strings as text, made on first use.
    plain: OnceLock<tokenizers::Tokenizer>,
    /// How token strings map back to bytes, worked out on first use.
    byte_decoder: OnceLock<std::result::Result<ByteDecoder, String>>,
}

struct ByteDecoder {
    byte_level: bool,
    /// Byte-level BPE's printable stand-in for each byte.
    alphabet: HashMap<char, u8>,
}

impl Tokenizer {
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let inner = trtllm_executor::builder::tokenizer_json::read(&path).map_err(|message| {
            ApiError::Tokenizer {
                path: path.clone(),
                message,
            }
        })?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: Value = match std::fs::read_to_string(&cfg_path) {
            Ok(t) => serde_json::from_str(&t).map_err(|e| ApiError::Tokenizer {
                path: cfg_path.clone(),
                message: format!("invalid JSON: {e}"),
            })?,
            Err(_) => Value::Null,
        };
        let token = |k: &str| match cfg.get(k) {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Object(o)) => o.get("content").and_then(Value::as_str).map(String::from),
            _ => None,
        };
        let template_file = dir.join("chat_template.jinja");
        let source = if template_file.exists() {
            Some(
                std::fs::read_to_string(&template_file).map_err(|e| ApiError::Tokenizer {
                    path: template_file,
                    message: e.to_string(),
                })?,
            )
        } else {
            match cfg.get("chat_template") {
                Some(Value::String(s)) => Some(s.clone()),
                // A list of named templates: the one called "default".
                Some(Value::Array(a)) => a
                    .iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                    .and_then(|t| t.get("template").and_then(Value::as_str))
                    .map(String::from),
                _ => None,
            }
        };
        let chat_template = source.map(ChatTemplate::new).transpose()?;
        Ok(Self {
            inner,
            bos_token: token("bos_token"),
            eos_token: token("eos_token"),
            chat_template,
            path,
            byte_decoder: OnceLock::new(),
            plain: OnceLock::new(),
        })
    }

    /// Token ids of `text`; `add_special_tokens` applies the tokenizer's post-processor
    /// (e.g. a BOS token for models that want one).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| self.error(e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Token ids of `text` with any special-token strings in it taken as plain text.
    pub fn encode_as_text(&self, text: &str) -> Result<Vec<u32>> {
        let plain = self.plain.get_or_init(|| {
            let mut t = self.inner.clone();
            t.set_encode_special_tokens(true);
            t
        });
        let enc = plain.encode(text, false).map_err(|e| self.error(e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The strings of the special tokens (`<|im_end|>`, `</s>`, ...).
    pub fn special_token_strings(&self) -> Vec<String> {
        self.inner
            .get_added_tokens_decoder()
            .values()
            .filter(|t| t.special)
            .map(|t| t.content.clone())
            .collect()
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| self.error(e))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The bytes each of the first `n` token ids adds to text: byte-level BPE's characters
    /// mapped back to bytes, SentencePiece's `▁` as a space and `<0xNN>` as its byte. Special
    /// tokens are `marker` then their name, so no text spells them; ids past the vocabulary
    /// are empty. An error for a decoder of a kind we do not know.
    pub fn token_bytes(&self, n: usize, marker: u8) -> Result<Vec<Vec<u8>>> {
        let d = self.byte_decoder()?;
        Ok((0..n as u32)
            .map(|id| self.bytes_of(d, id, Some(marker)))
            .collect())
    }

    /// The bytes token `id` adds to text on its own (a special token's: its name), which
    /// need not be whole UTF-8 characters.
    pub fn token_piece(&self, id: u32) -> Result<Vec<u8>> {
        Ok(self.bytes_of(self.byte_decoder()?, id, None))
    }

    fn byte_decoder(&self) -> Result<&ByteDecoder> {
        let made = self.byte_decoder.get_or_init(|| {
            let decoder = serde_json::to_string(&self.inner.get_decoder()).unwrap_or_default();
            let byte_level = decoder.contains("\"ByteLevel\"");
            if !byte_level && !decoder.contains("\"ByteFallback\"") && !decoder.contains("▁") {
                return Err(format!(
                    "token bytes: a decoder that is neither byte-level nor SentencePiece ({decoder})"
                ));
            }
            let alphabet = trtllm_executor::builder::gguf_tokenizer::byte_alphabet()
                .into_iter()
                .zip(0..=255)
                .collect();
            Ok(ByteDecoder {
                byte_level,
                alphabet,
            })
        });
        made.as_ref().map_err(|m| self.error(m.clone().into()))
    }

    /// Token `id`'s bytes; a special token's are `marker` then its name, or its name alone.
    fn bytes_of(&self, d: &ByteDecoder, id: u32, marker: Option<u8>) -> Vec<u8> {
        if let Some(t) = self
            .inner
            .get_added_tokens_decoder()
            .get(&id)
            .filter(|t| t.special)
        {
            return marker.into_iter().chain(t.content.bytes()).collect();
        }
        let Some(tok) = self.inner.id_to_token(id) else {
            return Vec::new();
        };
        if d.byte_level {
            let mut out = Vec::with_capacity(tok.len());
            for c in tok.chars() {
                match d.alphabet.get(&c) {
                    Some(&b) => out.push(b),
                    None => out.extend(c.to_string().as_bytes()),
                }
            }
            return out;
        }
        match tok.strip_prefix("<0x").and_then(|h| h.strip_suffix('>')) {
            Some(hex) if hex.len() == 2 => {
                u8::from_str_radix(hex, 16).map_or_else(|_| tok.clone().into_bytes(), |b| vec![b])
            }
            _ => tok.replace('▁', " ").into_bytes(),
        }
    }

    /// Uses `source` as the chat template instead of the checkpoint's (`--chat-template`).
    pub fn set_chat_template(&mut self, source: String) -> Result<()> {
        self.chat_template = Some(ChatTemplate::new(source)?);
        Ok(())
    }

    /// The chat template's source, if the tokenizer has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_ref().map(ChatTemplate::source)
    }

    /// Renders `messages` through the chat template (the tokenizer's, or the options' own).
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        opts: &ChatOptions,
    ) -> Result<String> {
        let special = SpecialTokens {
            bos: self.bos_token.as_deref(),
            eos: self.eos_token.as_deref(),
        };
        if let Some(source) = &opts.template {
            return ChatTemplate::new(source.clone())?.render(messages, opts, special);
        }
        let t = self.chat_template.as_ref().ok_or_else(|| {
            ApiError::ChatTemplate(format!(
                "{}: the tokenizer has no chat template (give one with --chat-template)",
                self.path.display()
            ))
        })?;
        t.render(messages, opts, special)
    }

    fn error(&self, e: tokenizers::Error) -> ApiError {
        ApiError::Tokenizer {
            path: self.path.clone(),
            message: e.to_string(),
        }
    }
}
