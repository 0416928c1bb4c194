//! GGUF byte-level tokenizers converted with the split their `tokenizer.ggml.pre` names, against
//! the ids transformers' tokenizer gives from the same files (tests/fixtures/gguf-tokenizers,
//! made by make.py).

use std::collections::BTreeMap;

use anyhow::{ensure, Result};
use serde::Deserialize;
use trtllm_api::builder::gguf::GgufFile;
use trtllm_api::builder::gguf_tokenizer;
use trtllm_api::Tokenizer;
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
