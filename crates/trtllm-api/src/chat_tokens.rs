//! A rendered conversation's token ids, with message content as text: a string that spells a
//! special token (`<|im_end|>`, `<|im_start|>system`) inside a message becomes the tokens of
//! that text, never the control token, so no message can forge another turn (transformers'
//! `split_special_tokens`). Only conversations whose content holds such a string take this
//! path; the others are tokenized whole, exactly as transformers does.

use crate::chat::{ChatMessage, ChatOptions};
use crate::{Result, Tokenizer};

/// Brackets a message's index in the rendering: private-use characters no tokenizer treats
/// as special and no template rewrites.
const OPEN: char = '\u{F0000}';
const CLOSE: char = '\u{F0001}';

impl Tokenizer {
    /// Token ids of `messages` rendered through the chat template, content as text unless
    /// `opts.special_tokens_in_content`.
    pub fn encode_chat(&self, messages: &[ChatMessage], opts: &ChatOptions) -> Result<Vec<u32>> {
        let specials = self.special_token_strings();
        let forged = messages
            .iter()
            .any(|m| specials.iter().any(|s| m.content.contains(s.as_str())));
        if opts.special_tokens_in_content || !forged {
            return self.encode(&self.apply_chat_template(messages, opts)?, false);
        }
        // Render with a placeholder for each content, then tokenize the template's text with
        // its control tokens and each content as plain text.
        let masked: Vec<ChatMessage> = messages
            .iter()
            .enumerate()
            .map(|(i, m)| ChatMessage {
                content: format!("{OPEN}{i}{CLOSE}"),
                ..m.clone()
            })
            .collect();
        let rendered = self.apply_chat_template(&masked, opts)?;
        let mut ids = Vec::new();
        let mut rest = rendered.as_str();
        while let Some(at) = rest.find(OPEN) {
            ids.extend(self.encode(&rest[..at], false)?);
            let after = &rest[at + OPEN.len_utf8()..];
            let end = after.find(CLOSE).unwrap_or(after.len());
            if let Some(m) = after[..end]
                .parse::<usize>()
                .ok()
                .and_then(|i| messages.get(i))
            {
                ids.extend(self.encode_as_text(&m.content)?);
            }
            rest = after.get(end + CLOSE.len_utf8()..).unwrap_or("");
        }
        ids.extend(self.encode(rest, false)?);
        Ok(ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_are_single_characters_outside_any_text() {
        assert_eq!(OPEN.len_utf8(), 4);
        assert_ne!(OPEN, CLOSE);
    }
}
