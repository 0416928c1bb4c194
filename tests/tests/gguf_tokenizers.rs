//! GGUF byte-level tokenizers converted with the split their `tokenizer.ggml.pre` names, against
//! the ids transformers' tokenizer gives from the same files (tests/fixtures/gguf-tokenizers,
//! made by make.py).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, ensure, Context, Result};
use serde::Deserialize;
use trtllm_api::builder::gguf::GgufFile;
use trtllm_api::builder::{build, gguf_tokenizer, BuildConfig};
use trtllm_api::{LlmArgs, Prompt, SamplingParams, Tokenizer, LLM};
use trtllm_tests::{fixtures, read_json};

#[derive(Deserialize)]
struct Case {
    text: String,
    ids: Vec<u32>,
}

#[test]
fn each_pre_tokenizer_split_gives_transformers_ids() -> Result<()> {
    let dir = fixtures().join("gguf-tokenizers");
    let golden: BTreeMap<String, Vec<Case>> = read_json(&dir.join("golden.json"))?;
    ensure!(golden.len() >= 5);
    for (file, cases) in &golden {
        let gguf = GgufFile::open(&dir.join(file))?;
        let (tokenizer, config) = gguf_tokenizer::convert(&gguf)?;
        let out = tempfile::tempdir()?;
        std::fs::write(out.path().join("tokenizer.json"), tokenizer.to_string())?;
        std::fs::write(out.path().join("tokenizer_config.json"), config.to_string())?;
        let tok = Tokenizer::from_dir(out.path())?;
        for c in cases {
            let ids = tok.encode(&c.text, false)?;
            ensure!(ids == c.ids, "{file} {:?}: {ids:?} != {:?}", c.text, c.ids);
            ensure!(tok.decode(&ids, false)? == c.text, "{file}: decode");
        }
    }
    Ok(())
}

/// A `tokenizer.ggml.pre` we do not know keeps GPT-2's split, with a warning that names it (the
/// smollm fixture with its name overwritten in place: same length, so the file stays valid).
#[test]
fn an_unknown_pre_tokenizer_is_a_warning_naming_it() -> Result<()> {
    let dir = fixtures().join("gguf-tokenizers");
    let bytes = std::fs::read(dir.join("smollm.gguf"))?;
    let at = bytes
        .windows(6)
        .position(|w| w == b"smollm")
        .context("pre name")?;
    let mut patched = bytes.clone();
    patched[at..at + 6].copy_from_slice(b"zorblx");
    let tmp = tempfile::tempdir()?;
    let path = tmp.path().join("zorblx.gguf");
    std::fs::write(&path, patched)?;
    let gguf = GgufFile::open(&path)?;

    let log = Log::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(log.clone())
        .with_ansi(false)
        .finish();
    tracing::subscriber::with_default(subscriber, || gguf_tokenizer::convert(&gguf))?;
    let text = String::from_utf8(log.0.lock().map_err(|_| anyhow!("log"))?.clone())?;
    ensure!(
        text.contains("WARN") && text.contains("\"zorblx\""),
        "{text:?}"
    );

    // A known name warns of nothing.
    let log = Log::default();
    let subscriber = tracing_subscriber::fmt().with_writer(log.clone()).finish();
    let known = GgufFile::open(&dir.join("smollm.gguf"))?;
    tracing::subscriber::with_default(subscriber, || gguf_tokenizer::convert(&known))?;
    ensure!(log.0.lock().map_err(|_| anyhow!("log"))?.is_empty());
    Ok(())
}

/// Log output collected in memory.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Log {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .map_err(|_| std::io::Error::other("log poisoned"))?
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Log {
    type Writer = Log;
    fn make_writer(&'a self) -> Log {
        self.clone()
    }
}

#[derive(Deserialize)]
struct SpmCase {
    text: String,
    ids: Vec<u32>,
    decoded: String,
}

/// A tiny Llama GGUF whose tokenizer is SentencePiece (600 BPE pieces, byte fallback) builds,
/// runs, and tokenizes like transformers from the same file (make_spm.py).
#[test]
fn a_sentencepiece_llama_gguf_builds_and_tokenizes_like_transformers() -> Result<()> {
    let dir = fixtures().join("gguf-tokenizers");
    let golden: Vec<SpmCase> = read_json(&dir.join("spm-llama.json"))?;
    let out = tempfile::tempdir()?;
    build(
        &dir.join("spm-llama.gguf"),
        out.path(),
        &BuildConfig::default(),
        &mut |_, _, _| {},
    )?;
    let llm = LLM::new(LlmArgs {
        model: out.path().into(),
        ..Default::default()
    })?;
    let tok = llm.tokenizer()?;
    for c in &golden {
        let ids = tok.encode(&c.text, true)?;
        ensure!(ids == c.ids, "{:?}: {ids:?} != {:?}", c.text, c.ids);
        ensure!(tok.decode(&ids, true)? == c.decoded, "{:?}: decode", c.text);
    }
    let params = SamplingParams {
        max_tokens: 4,
        ignore_eos: true,
        ..Default::default()
    };
    let out = llm.generate(&[Prompt::Text(golden[0].text.clone())], &params)?;
    ensure!(out[0].outputs[0].token_ids.len() == 4);
    Ok(())
}
