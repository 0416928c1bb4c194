//! The engine directory's tokenizer (`tokenizer.json` through the `tokenizers` crate) with its
//! special tokens and chat template from `tokenizer_config.json` / `chat_template.jinja`.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::chat::{ChatMessage, ChatTemplate};
use crate::{ApiError, Result};

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos_token: Option<String>,
    eos_token: Option<String>,
    chat_template: Option<ChatTemplate>,
    path: PathBuf,
}

impl Tokenizer {
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let inner = tokenizers::Tokenizer::from_file(&path).map_err(|e| ApiError::Tokenizer {
            path: path.clone(),
            message: e.to_string(),
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

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| self.error(e))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Renders `messages` through the chat template, ending with the assistant's turn opener.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let t = self.chat_template.as_ref().ok_or_else(|| {
            ApiError::ChatTemplate(format!(
                "{}: the tokenizer has no chat template",
                self.path.display()
            ))
        })?;
        t.render(
            messages,
            add_generation_prompt,
            self.bos_token.as_deref(),
            self.eos_token.as_deref(),
        )
    }

    fn error(&self, e: tokenizers::Error) -> ApiError {
        ApiError::Tokenizer {
            path: self.path.clone(),
            message: e.to_string(),
        }
    }
}
