//! Reading `tokenizer.json` through the `tokenizers` crate, which panics on some malformed
//! files (an `expect` in its decoder deserializer): a corrupt file must be an error naming it,
//! so the panic is caught here, for the builder's check and the API's tokenizer alike.

use std::path::Path;

/// The tokenizer, or why the file is not one.
pub fn read(path: &Path) -> Result<tokenizers::Tokenizer, String> {
    match std::panic::catch_unwind(|| tokenizers::Tokenizer::from_file(path)) {
        Ok(Ok(t)) => Ok(t),
        Ok(Err(e)) => Err(e.to_string()),
        Err(panic) => Err(trtllm_runtime::panic_message(panic.as_ref())
            .map_or("malformed".into(), |m| format!("malformed ({m})"))),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_decoder_the_library_panics_on_is_an_error() {
        // Found by the fuzzer (fuzz/corpus/tokenizer): a non-string key inside "decoder".
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tokenizer.json");
        let json = r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],
            "normalizer":null,"pre_tokenizer":null,"post_processor":null,
            "decoder":{"type":"ByteLevel",1:2},
            "model":{"type":"BPE","vocab":{"a":0},"merges":[]}}"#;
        std::fs::write(&path, json).expect("write");
        let err = super::read(&path).expect_err("malformed");
        assert!(!err.is_empty());
    }
}
