//! `trtllm serve MODEL`: the OpenAI-compatible server.

use anyhow::Result;
use clap::Args;
use trtllm_api::runtime::parallel;
use trtllm_api::ToolParser;
use trtllm_serve::{OnSignal, ServeConfig};

use crate::run::{open, ExecutorArgs, ModelArg};

/// Where an HTTP front listens, and the key its clients must give (`serve`, `router`).
#[derive(Args)]
pub struct ListenArgs {
    /// Loopback unless told otherwise.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// 0 picks a free port.
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` from clients (on the /v1 routes).
    #[arg(long, env = "TRTLLM_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
}

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub(crate) model: ModelArg,
    #[command(flatten)]
    listen: ListenArgs,
    /// The model ids clients may use, repeated or comma-separated; responses name the one asked
    /// for (default: the model path's last component).
    #[arg(long, value_delimiter = ',')]
    served_model_name: Vec<String>,
    /// Sequences (prompts x n) in flight beyond this get 503.
    #[arg(long, alias = "max-pending-requests", default_value_t = 1024)]
    max_pending_sequences: usize,
    /// A request asking for more sequences (prompts x n) than this gets 400.
    #[arg(long, default_value_t = 256)]
    max_sequences_per_request: usize,
    /// Open connections beyond this get 503 and are closed.
    #[arg(long, default_value_t = 4096)]
    max_connections: usize,
    /// Seconds a client has to send a request's headers (and each part of its body); an idle
    /// keep-alive connection is closed after it too.
    #[arg(long, default_value_t = 20)]
    header_timeout: u64,
    /// Request bodies larger than this get 413.
    #[arg(long, default_value_t = 4 << 20)]
    max_body_bytes: usize,
    /// Warn of request fields we do not implement and ignore them, instead of answering 400
    /// (for clients that always send extras).
    #[arg(long)]
    lenient_requests: bool,
    /// A Jinja chat template file used instead of the checkpoint's (e.g. one that shows tools
    /// to the model: docs/chat_templates/).
    #[arg(long, value_name = "FILE")]
    chat_template: Option<std::path::PathBuf>,
    /// How the model writes tool calls, for `tool_choice: auto` (hermes, llama3_json, mistral);
    /// default: read from the chat template's markers.
    #[arg(long, value_parser = parse_tool_parser)]
    tool_call_parser: Option<ToolParser>,
    /// LoRA adapters to serve, as NAME=DIR (PEFT directories; repeat or list): a request whose
    /// `model` is NAME runs with that adapter.
    #[arg(long, value_name = "NAME=DIR", num_args = 1.., value_parser = parse_lora_module)]
    lora_modules: Vec<(String, std::path::PathBuf)>,
    #[command(flatten)]
    executor: ExecutorArgs,
}

pub fn serve(a: ServeArgs) -> Result<()> {
    let model = a.model.path()?;
    let mut names = a.served_model_name.clone();
    if names.is_empty() {
        names.push(
            model
                .file_name()
                .map_or("model".into(), |n| n.to_string_lossy().into_owned()),
        );
    }
    let llm = open(
        &a.model,
        a.executor.config(),
        a.executor.device,
        a.chat_template.as_deref(),
    )?;
    trtllm_serve::serve(
        llm,
        ServeConfig {
            host: a.listen.host,
            port: a.listen.port,
            api_key: a.listen.api_key,
            served_model_names: names,
            max_body_bytes: a.max_body_bytes,
            max_pending_sequences: a.max_pending_sequences,
            max_sequences_per_request: a.max_sequences_per_request,
            max_connections: a.max_connections,
            header_timeout: std::time::Duration::from_secs(a.header_timeout),
            lenient_requests: a.lenient_requests,
            tool_call_parser: a.tool_call_parser,
            lora_modules: a.lora_modules,
            // mpirun tears the whole job down when a rank exits: rank 0 cannot drain.
            on_signal: match parallel::world().is_some_and(|w| w.size() > 1) {
                true => OnSignal::FailAndExit,
                false => OnSignal::Drain,
            },
        },
    )?;
    Ok(())
}

fn parse_lora_module(s: &str) -> Result<(String, std::path::PathBuf), String> {
    match s.split_once('=') {
        Some((name, dir)) if !name.is_empty() && !dir.is_empty() => Ok((name.into(), dir.into())),
        _ => Err(format!("'{s}': expected NAME=DIR")),
    }
}

fn parse_tool_parser(name: &str) -> Result<ToolParser, String> {
    ToolParser::from_name(name).map_err(|e| e.to_string())
}
