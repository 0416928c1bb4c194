//! `trtllm chat MODEL`: a conversation at the terminal. Each line read is a user turn; the
//! reply streams through the chat template with the whole conversation so far.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use rustyline::error::ReadlineError;
use rustyline::DefaultEditor;
use trtllm_api::ChatMessage;

use crate::run::{open, ExecutorArgs, ModelArg, SamplingArgs};

#[derive(Args)]
pub struct ChatArgs {
    #[command(flatten)]
    pub(crate) model: ModelArg,
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
        &a.model,
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
    let mut input = Input::open()?;
    let mut out = std::io::stdout();
    loop {
        let Some(line) = input.read_line()? else {
            writeln!(out)?;
            return Ok(());
        };
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

/// Where user turns come from: a terminal gets line editing and the history of earlier
/// sessions (up and down arrows; kept in the cache directory); piped input is read as lines.
enum Input {
    Terminal {
        editor: Box<DefaultEditor>,
        history: PathBuf,
    },
    Piped(std::io::Lines<std::io::StdinLock<'static>>),
}

impl Input {
    fn open() -> Result<Self> {
        if !std::io::stdin().is_terminal() {
            return Ok(Self::Piped(std::io::stdin().lock().lines()));
        }
        let mut editor = DefaultEditor::new().context("line editor")?;
        let history = trtllm_api::cache_dir().join("chat_history.txt");
        // No history yet is the usual first run, not an error.
        let _ = editor.load_history(&history);
        Ok(Self::Terminal {
            editor: Box::new(editor),
            history,
        })
    }

    /// The next line; None at the end of input (Ctrl-D). Ctrl-C abandons the line being typed.
    fn read_line(&mut self) -> Result<Option<String>> {
        match self {
            Self::Piped(lines) => {
                print!("> ");
                std::io::stdout().flush()?;
                Ok(lines.next().transpose().context("reading stdin")?)
            }
            Self::Terminal { editor, history } => loop {
                match editor.readline("> ") {
                    Ok(line) => {
                        if !line.trim().is_empty() {
                            let _ = editor.add_history_entry(line.as_str());
                            if let Some(dir) = history.parent() {
                                let _ = std::fs::create_dir_all(dir);
                            }
                            if let Err(e) = editor.save_history(history) {
                                tracing::warn!("{}: {e}", history.display());
                            }
                        }
                        return Ok(Some(line));
                    }
                    Err(ReadlineError::Interrupted) => continue,
                    Err(ReadlineError::Eof) => return Ok(None),
                    Err(e) => return Err(e).context("reading the terminal"),
                }
            },
        }
    }
}
