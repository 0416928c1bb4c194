//! `trtllm chat MODEL`: a conversation at the terminal. Each line read is a user turn; the
//! reply streams through the chat template with the whole conversation so far.

use std::io::{BufRead, Write};

use anyhow::{Context, Result};
use clap::Args;
use trtllm_api::ChatMessage;

use crate::run::{open, ExecutorArgs, ModelArg, SamplingArgs};

#[derive(Args)]
pub struct ChatArgs {
    #[command(flatten)]
    model: ModelArg,
    /// A system message that opens the conversation (and survives /reset).
    #[arg(long)]
    system: Option<String>,
    /// A Jinja chat template file used instead of the checkpoint's.
    #[arg(long, value_name = "FILE")]
    chat_template: Option<std::path::PathBuf>,
    #[command(flatten)]
    sampling: SamplingArgs,
    #[command(flatten)]
    executor: ExecutorArgs,
}

pub fn chat(a: ChatArgs) -> Result<()> {
    let params = a.sampling.params()?;
    let llm = open(
        a.model.path()?,
        a.executor.config(),
        a.executor.device,
        a.chat_template.as_deref(),
    )?;
    let opening: Vec<ChatMessage> = a
        .system
        .iter()
        .map(|s| ChatMessage::new("system", s))
        .collect();
    let mut history = opening.clone();
    let (stdin, mut out) = (std::io::stdin(), std::io::stdout());
    let mut lines = stdin.lock().lines();
    loop {
        write!(out, "> ")?;
        out.flush()?;
        let Some(line) = lines.next() else {
            writeln!(out)?;
            return Ok(());
        };
        let line = line.context("reading stdin")?;
        match line.trim() {
            "" => continue,
            "/exit" | "/quit" => return Ok(()),
            "/reset" => {
                history = opening.clone();
                continue;
            }
            _ => {}
        }
        history.push(ChatMessage::new("user", &line));
        let mut stream = llm.chat_async(&history, &params)?;
        let mut reply = String::new();
        while let Some(delta) = stream.next_delta() {
            let text = delta?.text;
            out.write_all(text.as_bytes())?;
            out.flush()?;
            reply.push_str(&text);
        }
        writeln!(out)?;
        history.push(ChatMessage::new("assistant", &reply));
    }
}
