//! vLLM's `/tokenize` and `/detokenize`, and `/version`: what a client needs to count tokens
//! against `max_model_len` the way the server will.

use std::sync::Arc;

use axum::extract::State;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::chat::{ChatMessageIn, TemplateFields};
use crate::handlers::JsonBody;
use crate::protocol::check_unknown;
use crate::state::AppState;
use crate::ServeError;

/// A text (`prompt`) or a conversation (`messages`), as vLLM takes them.
#[derive(Deserialize)]
pub struct TokenizeRequest {
    model: Option<String>,
    prompt: Option<String>,
    messages: Option<Vec<ChatMessageIn>>,
    /// Default: true for a prompt, false for messages (the template writes its own).
    add_special_tokens: Option<bool>,
    /// Messages only: how they are rendered, as the chat endpoint renders them.
    #[serde(flatten)]
    template: TemplateFields,
    #[serde(flatten)]
    extra: Map<String, Value>,
}

#[derive(Deserialize)]
pub struct DetokenizeRequest {
    model: Option<String>,
    tokens: Vec<u32>,
    #[serde(flatten)]
    extra: Map<String, Value>,
}

pub async fn tokenize(
    State(st): State<Arc<AppState>>,
    JsonBody(req): JsonBody<TokenizeRequest>,
) -> Result<Json<Value>, ServeError> {
    st.check_model(req.model.as_deref())?;
    check_unknown(&req.extra, "", st.config.lenient_requests)?;
    let lenient = st.config.lenient_requests;
    let st2 = st.clone();
    let tokens = tokio::task::spawn_blocking(move || -> Result<Vec<u32>, ServeError> {
        let tok = st2.llm.tokenizer()?;
        match (req.prompt, req.messages) {
            (Some(p), None) => Ok(tok.encode(&p, req.add_special_tokens.unwrap_or(true))?),
            (None, Some(m)) => {
                let opts = req.template.options()?;
                let roles = crate::chat::template_roles(&st2, &opts)?;
                let messages = crate::chat::chat_messages(m, &roles, lenient)?;
                if req.add_special_tokens.unwrap_or(false) {
                    let text = tok.apply_chat_template(&messages, &opts)?;
                    return Ok(tok.encode(&text, true)?);
                }
                Ok(st2.llm.chat_prompt(&messages, &opts)?)
            }
            _ => Err(ServeError::bad(
                "give either prompt or messages",
                Some("prompt"),
            )),
        }
    })
    .await
    .map_err(|e| ServeError::Internal(e.to_string()))??;
    Ok(Json(json!({
        "count": tokens.len(),
        "max_model_len": st.llm.executor().engine_config().build.max_seq_len,
        "tokens": tokens,
        "token_strs": null,
    })))
}

pub async fn detokenize(
    State(st): State<Arc<AppState>>,
    JsonBody(req): JsonBody<DetokenizeRequest>,
) -> Result<Json<Value>, ServeError> {
    st.check_model(req.model.as_deref())?;
    check_unknown(&req.extra, "", st.config.lenient_requests)?;
    let tok = st.llm.tokenizer()?;
    let vocab = st.llm.executor().engine_config().model.vocab_size;
    if let Some(bad) = req.tokens.iter().find(|&&t| t as usize >= vocab) {
        return Err(ServeError::bad(
            format!("token {bad} is outside the vocabulary (0..{vocab})"),
            Some("tokens"),
        ));
    }
    Ok(Json(json!({"prompt": tok.decode(&req.tokens, false)?})))
}

pub async fn version() -> Json<Value> {
    Json(json!({"version": env!("CARGO_PKG_VERSION")}))
}
