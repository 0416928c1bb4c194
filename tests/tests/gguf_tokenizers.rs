//! GGUF byte-level tokenizers converted with the split their `tokenizer.ggml.pre` names, against
//! the ids transformers' tokenizer gives from the same files (tests/fixtures/gguf-tokenizers,
//! made by make.py).

use std::collections::BTreeMap;

use anyhow::{ensure, Result};
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
