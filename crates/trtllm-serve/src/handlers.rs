//! The HTTP endpoints. Generation endpoints parse and validate, tokenize and submit on a
//! blocking thread (so bad input is answered with its status before any stream starts), then
//! either collect the whole response or stream server-sent events ending in `[DONE]`.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{FromRequest, Request, State};
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE};
use axum::middleware::Next;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;
use serde_json::json;
use subtle::ConstantTimeEq;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use trtllm_api::{Prompt, RequestStream, SamplingParams, LLM};

use crate::chat::ChatRequest;
use crate::format::{ChoiceText, Endpoint, Formatter};
use crate::generation::{Generation, GenerationSpec};
use crate::protocol::{CompletionRequest, Parsed};
use crate::state::AppState;
use crate::ServeError;

type AppResult = Result<Response, ServeError>;

/// A JSON body whose failures (too large, malformed) come back in OpenAI's error shape.
pub struct JsonBody<T>(pub T);

/// How much of an oversized body is read (and dropped) so the client, which is usually still
/// sending it, gets the 413 instead of a broken pipe; beyond this the connection is closed.
const DRAIN_LIMIT: usize = 64 << 20;

impl<T: DeserializeOwned> FromRequest<Arc<AppState>> for JsonBody<T> {
    type Rejection = ServeError;

    async fn from_request(req: Request, st: &Arc<AppState>) -> Result<Self, ServeError> {
        let limit = st.config.max_body_bytes;
        let mut body = req.into_body().into_data_stream();
        let (mut bytes, mut seen) = (Vec::new(), 0usize);
        let wait = st.config.header_timeout;
        loop {
            let next = tokio::time::timeout(wait, body.next()).await.map_err(|_| {
                ServeError::Timeout(format!("no part of the request body within {wait:?}"))
            })?;
            let Some(chunk) = next else {
                break;
            };
            let chunk =
                chunk.map_err(|e| ServeError::bad(format!("reading the body: {e}"), None))?;
            seen += chunk.len();
            if seen <= limit {
                bytes.extend_from_slice(&chunk);
            } else if seen > DRAIN_LIMIT {
                break;
            }
        }
        if seen > limit {
            return Err(ServeError::TooLarge(format!(
                "request body of {seen}{} bytes exceeds the limit of {limit} bytes",
                if seen > DRAIN_LIMIT { "+" } else { "" }
            )));
        }
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|e| ServeError::bad(format!("invalid request body: {e}"), None))
    }
}

/// Checks `Authorization: Bearer KEY` when the server has a key, before the body is read: the
/// scheme in any case (RFC 7235), the key compared in constant time.
pub async fn auth(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let Some(key) = &st.config.api_key {
        if !bearer_matches(req.headers(), key) {
            return ServeError::Unauthorized.into_response();
        }
    }
    next.run(req).await
}

/// Whether `headers` carry `Authorization: Bearer KEY` (compared in constant time).
pub(crate) fn bearer_matches(headers: &axum::http::HeaderMap, key: &str) -> bool {
    let given = headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, k)| k.trim());
    given.is_some_and(|g| bool::from(g.as_bytes().ct_eq(key.as_bytes())))
}

/// Counts every error response by status.
pub async fn count_errors(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let res = next.run(req).await;
    if res.status().is_client_error() || res.status().is_server_error() {
        st.metrics.error(res.status().as_u16());
    }
    res
}

pub async fn method_not_allowed(req: Request) -> ServeError {
    ServeError::MethodNotAllowed(format!(
        "{} is not allowed on {}",
        req.method(),
        req.uri().path()
    ))
}

pub async fn not_found(req: Request) -> ServeError {
    ServeError::NotFound(format!(
        "no route for {} {}",
        req.method(),
        req.uri().path()
    ))
}

pub async fn health() -> &'static str {
    "ok"
}

pub async fn metrics(State(st): State<Arc<AppState>>) -> AppResult {
    let text = tokio::task::spawn_blocking(move || st.metrics.render(st.llm.executor()))
        .await
        .map_err(|e| ServeError::Internal(e.to_string()))?;
    Ok((
        [(
            CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

/// The base model under each of its names, then each LoRA adapter with the base as `parent` and
/// its directory as `root` (vLLM's listing).
pub async fn models(State(st): State<Arc<AppState>>) -> Json<serde_json::Value> {
    let config = st.llm.executor().engine_config();
    let entry = |id: &str| {
        json!({
            "id": id,
            "object": "model",
            "created": st.created,
            "owned_by": "trtllm-rs",
            "max_model_len": config.build.max_seq_len,
            "vocab_size": config.model.vocab_size,
        })
    };
    let names = &st.config.served_model_names;
    let mut data: Vec<_> = names.iter().map(|n| entry(n)).collect();
    for lora in st.adapters().list() {
        let mut e = entry(&lora.name);
        e["parent"] = json!(names.first());
        e["root"] = json!(lora.path.display().to_string());
        data.push(e);
    }
    Json(json!({"object": "list", "data": data}))
}

pub async fn completions(
    State(st): State<Arc<AppState>>,
    JsonBody(req): JsonBody<CompletionRequest>,
) -> AppResult {
    let arrived = Instant::now();
    let (model, lora) = st.check_model(req.model.as_deref())?;
    let mut parsed = req.params(st.config.lenient_requests)?;
    parsed.params.lora_request = lora;
    run(
        st,
        (Endpoint::Completions, model),
        arrived,
        parsed,
        |llm, prompts| prompts.iter().map(|p| llm.encode_prompt(p)).collect(),
    )
    .await
}

pub async fn chat(
    State(st): State<Arc<AppState>>,
    JsonBody(req): JsonBody<ChatRequest>,
) -> AppResult {
    let arrived = Instant::now();
    let (model, lora) = st.check_model(req.model.as_deref())?;
    let mut parsed = req.params(&st)?;
    parsed.params.lora_request = lora;
    run(st, (Endpoint::Chat, model), arrived, parsed, |llm, chat| {
        Ok(vec![llm.chat_prompt(&chat.messages, &chat.options)?])
    })
    .await
}

/// Sets its flag when dropped: the handler's future is dropped when its client disconnects.
struct SetOnDrop(Arc<AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// The longest sequence a request may have: the engine's context, and what the KV pool holds
/// (at most the context).
#[derive(Clone, Copy)]
struct Room {
    context: usize,
    pool: usize,
}

/// The completion length a prompt of `len` tokens gets: what it asked for, or what the context
/// and the KV pool leave; asking for more than the context leaves is OpenAI's
/// `context_length_exceeded` (more than the pool holds is the executor's 413, naming the pool).
fn fit(len: usize, asked: Option<usize>, room: Room) -> Result<usize, ServeError> {
    let left = room.context.saturating_sub(len);
    match asked {
        Some(n) if n <= left => Ok(n),
        // A prompt the pool cannot hold gets 1, and the executor's 413 names the pool.
        None if left > 0 => Ok(room.pool.saturating_sub(len).clamp(1, left)),
        _ => Err(ServeError::ContextLength {
            len,
            max: room.context,
            asked,
        }),
    }
}

/// Admits the request, tokenizes its inputs on a blocking thread (tokenizing and templating
/// are CPU work) and submits each within the context, then collects or streams the result.
async fn run<T: Send + 'static>(
    st: Arc<AppState>,
    (endpoint, model): (Endpoint, String),
    arrived: Instant,
    parsed: Parsed<T>,
    encode: impl FnOnce(&LLM, T) -> trtllm_api::Result<Vec<Vec<u32>>> + Send + 'static,
) -> AppResult {
    let Parsed {
        params,
        max_tokens,
        inputs,
        stream: streamed,
        include_usage,
        tool_calls,
        echo,
        prompts: num_prompts,
    } = parsed;
    let sequences = num_prompts.saturating_mul(params.n);
    let most = st.config.max_sequences_per_request;
    if sequences > most {
        return Err(ServeError::bad(
            format!(
                "the request asks for {sequences} sequences ({num_prompts} prompts x n = {}); \
                 this server takes at most {most} per request (--max-sequences-per-request)",
                params.n
            ),
            Some(if num_prompts > 1 { "prompt" } else { "n" }),
        ));
    }
    let admission = st.admit(sequences)?;
    let llm = st.llm.clone();
    let submitted = params.clone();
    let room = Room {
        context: llm.executor().engine_config().build.max_seq_len,
        pool: llm.executor().max_sequence_len(),
    };
    // Set if the client goes away while its prompts are still being submitted.
    let gone = Arc::new(AtomicBool::new(false));
    let _gone_on_drop = SetOnDrop(gone.clone());
    let submit = move || -> Result<Vec<RequestStream>, ServeError> {
        let prompts = encode(&llm, inputs)?;
        // Every prompt fits before any is submitted, so a bad one cancels nothing.
        let lens = prompts
            .iter()
            .map(|ids| fit(ids.len(), max_tokens, room))
            .collect::<Result<Vec<_>, _>>()?;
        let mut streams = Vec::with_capacity(prompts.len());
        for (ids, n) in prompts.into_iter().zip(lens) {
            if gone.load(Ordering::Relaxed) {
                // Dropping what was submitted cancels it.
                return Err(ServeError::Internal("the client went away".into()));
            }
            let params = SamplingParams {
                max_tokens: n,
                ..submitted.clone()
            };
            streams.push(llm.generate_async(Prompt::TokenIds(ids), &params)?);
        }
        Ok(streams)
    };
    let streams = tokio::task::spawn_blocking(submit)
        .await
        .map_err(|e| ServeError::Internal(e.to_string()))??;
    let first_id = streams.first().map_or(0, RequestStream::request_id);
    let prefix = match endpoint {
        Endpoint::Completions => "cmpl",
        Endpoint::Chat => "chatcmpl",
    };
    let id = format!("{prefix}-{:x}-{first_id}", st.created);
    let gen = Generation::start(
        GenerationSpec {
            id: id.clone(),
            n: params.n,
            arrived,
            tool_calls,
            echo,
        },
        admission,
        streams,
    );
    let fmt = Formatter {
        endpoint,
        id,
        model,
        created: crate::state::unix_time(),
        want_logprobs: params.logprobs.is_some(),
        n: params.n,
    };
    if streamed {
        Ok(stream(st, gen, fmt, include_usage).into_response())
    } else {
        collect(st, gen, fmt).await
    }
}

async fn collect(st: Arc<AppState>, mut gen: Generation, fmt: Formatter) -> AppResult {
    while let Some(item) = gen.next().await {
        item?;
    }
    let tok = st.llm.tokenizer().ok();
    let body = fmt.response(tok, &gen.choices(), gen.prompts(), gen.usage());
    Ok(Json(body).into_response())
}

/// Streams chunks through a task of its own; when the client goes away the task sees the
/// channel close, stops, and dropping the generation cancels its requests.
fn stream(
    st: Arc<AppState>,
    mut gen: Generation,
    fmt: Formatter,
    include_usage: bool,
) -> Sse<impl tokio_stream::Stream<Item = Result<Event, Infallible>>> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Event>(64);
    tokio::spawn(async move {
        let data = |v: serde_json::Value| Event::default().data(v.to_string());
        if fmt.endpoint == Endpoint::Chat {
            for i in 0..gen.num_choices() {
                if tx
                    .send(data(fmt.role_chunk(i, include_usage)))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
        let tok = st.llm.tokenizer().ok();
        // Echoed prompts open their choices.
        for i in 0..gen.num_choices() {
            let Some(echo) = gen.prompts()[i / fmt.n.max(1)].echo.clone() else {
                continue;
            };
            let piece = ChoiceText {
                text: echo,
                ..ChoiceText::default()
            };
            if tx
                .send(data(fmt.chunk(tok, i, &piece, include_usage)))
                .await
                .is_err()
            {
                return;
            }
        }
        loop {
            let item = tokio::select! {
                _ = tx.closed() => return,
                item = gen.next() => item,
            };
            let event = match item {
                None => break,
                Some(Ok((i, piece))) => data(fmt.chunk(tok, i, &piece, include_usage)),
                Some(Err(e)) => {
                    let _ = tx.send(data(e.body())).await;
                    break;
                }
            };
            if tx.send(event).await.is_err() {
                return;
            }
        }
        if include_usage {
            let _ = tx.send(data(fmt.usage_chunk(gen.usage()))).await;
        }
        let _ = tx.send(Event::default().data("[DONE]")).await;
    });
    Sse::new(ReceiverStream::new(rx).map(Ok)).keep_alive(KeepAlive::default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completion_lengths_fit_the_context_and_the_pool() {
        let room = Room {
            context: 100,
            pool: 60,
        };
        // Unasked, a completion gets what the pool leaves, not the context.
        assert_eq!(fit(10, None, room).unwrap(), 50);
        // Asked, the context judges here and the executor judges the pool (413 naming it).
        assert_eq!(fit(10, Some(80), room).unwrap(), 80);
        assert_eq!(fit(70, None, room).unwrap(), 1);
        assert!(fit(10, Some(95), room).is_err());
        assert!(fit(100, None, room).is_err());
    }
}
