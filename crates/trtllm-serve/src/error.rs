//! Every failure a client can see, with its HTTP status, in OpenAI's error shape:
//! `{"error": {"message", "type", "param", "code"}}`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use thiserror::Error;
use trtllm_api::executor::ExecutorError;
use trtllm_api::runtime::RuntimeError;
use trtllm_api::ApiError;

#[derive(Debug, Error)]
pub enum ServeError {
    #[error("{message}")]
    BadRequest {
        message: String,
        param: Option<String>,
    },
    #[error(
        "This model's maximum context length is {max} tokens; the prompt has {len}{}",
        asked.map_or(String::new(), |n| format!(" and max_tokens asks for {n} more"))
    )]
    ContextLength {
        len: usize,
        max: usize,
        /// The completion tokens asked for, when that is what overflows.
        asked: Option<usize>,
    },
    #[error("Incorrect API key provided")]
    Unauthorized,
    #[error("The model `{0}` does not exist")]
    ModelNotFound(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    /// The client sent too slowly.
    #[error("{0}")]
    Timeout(String),
    /// The server's own settings, refused at start.
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("server overloaded: {0}")]
    Overloaded(String),
    #[error("{0}")]
    Internal(String),
    /// Binding or serving the listening socket.
    #[error("{addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
}

impl ServeError {
    pub fn bad(message: impl Into<String>, param: Option<&str>) -> Self {
        ServeError::BadRequest {
            message: message.into(),
            param: param.map(String::from),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ServeError::BadRequest { .. } | ServeError::ContextLength { .. } => {
                StatusCode::BAD_REQUEST
            }
            ServeError::Unauthorized => StatusCode::UNAUTHORIZED,
            ServeError::ModelNotFound(_) | ServeError::NotFound(_) => StatusCode::NOT_FOUND,
            ServeError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ServeError::Timeout(_) => StatusCode::REQUEST_TIMEOUT,
            ServeError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ServeError::Overloaded(_) => StatusCode::SERVICE_UNAVAILABLE,
            ServeError::Internal(_) | ServeError::Listen { .. } | ServeError::Config(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }

    fn kind_and_code(&self) -> (&'static str, Option<&'static str>) {
        match self {
            ServeError::BadRequest { .. } => ("invalid_request_error", None),
            ServeError::ContextLength { .. } => {
                ("invalid_request_error", Some("context_length_exceeded"))
            }
            ServeError::Unauthorized => ("authentication_error", Some("invalid_api_key")),
            ServeError::ModelNotFound(_) => ("invalid_request_error", Some("model_not_found")),
            ServeError::NotFound(_) | ServeError::MethodNotAllowed(_) | ServeError::Timeout(_) => {
                ("invalid_request_error", None)
            }
            ServeError::TooLarge(_) => ("invalid_request_error", Some("request_too_large")),
            ServeError::Overloaded(_) => ("server_error", Some("overloaded")),
            ServeError::Internal(_) | ServeError::Listen { .. } | ServeError::Config(_) => {
                ("server_error", None)
            }
        }
    }

    /// The JSON body (also sent as an SSE event when a stream fails midway).
    pub fn body(&self) -> serde_json::Value {
        let (kind, code) = self.kind_and_code();
        let param = match self {
            ServeError::BadRequest { param, .. } => param.clone(),
            ServeError::ModelNotFound(_) => Some("model".into()),
            _ => None,
        };
        serde_json::json!({"error": {
            "message": self.to_string(),
            "type": kind,
            "param": param,
            "code": code,
        }})
    }
}

impl IntoResponse for ServeError {
    fn into_response(self) -> Response {
        (self.status(), Json(self.body())).into_response()
    }
}

impl From<ApiError> for ServeError {
    fn from(e: ApiError) -> Self {
        match e {
            ApiError::InvalidParam { field, .. } => ServeError::bad(e.to_string(), Some(field)),
            ApiError::InvalidInput(m) => ServeError::bad(m, None),
            ApiError::ChatTemplate(m) => ServeError::bad(format!("chat template: {m}"), None),
            ApiError::Tokenizer { .. } => ServeError::Internal(e.to_string()),
            ApiError::Executor(e) => e.into(),
        }
    }
}

impl From<ExecutorError> for ServeError {
    fn from(e: ExecutorError) -> Self {
        match e {
            ExecutorError::ShutDown => ServeError::Overloaded(e.to_string()),
            ExecutorError::RequestTooLarge { .. } => ServeError::TooLarge(e.to_string()),
            ExecutorError::Runtime(RuntimeError::PromptTooLong { len, max, .. }) => {
                ServeError::ContextLength {
                    len,
                    max,
                    asked: None,
                }
            }
            ExecutorError::Runtime(RuntimeError::InvalidSampling { field, .. }) => {
                ServeError::bad(e.to_string(), Some(field))
            }
            ExecutorError::Runtime(
                RuntimeError::EmptyPrompt | RuntimeError::TokenOutOfRange { .. },
            ) => ServeError::bad(e.to_string(), Some("prompt")),
            // A grammar past the matcher's limits is the request's, not the server's.
            ExecutorError::LogitsProcessor(_) => ServeError::bad(e.to_string(), None),
            ExecutorError::Runtime(RuntimeError::Lora { .. }) => {
                ServeError::bad(e.to_string(), Some("lora_path"))
            }
            _ => ServeError::Internal(e.to_string()),
        }
    }
}
