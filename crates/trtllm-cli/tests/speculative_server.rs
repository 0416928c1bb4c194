//! `trtllm serve` with speculative decoding, against a plain server.

mod common;

use common::Server;
use serde_json::json;

/// `serve --ngram-lookup`: a plain server's greedy text, with the drafts counted in `/metrics`.
#[test]
fn speculative_serving_gives_plain_text_and_counts_drafts() {
    let prompt =
        "one two three four five six seven eight. one two three four five six seven eight. one";
    let body = json!({"prompt": prompt, "max_tokens": 24, "temperature": 0, "ignore_eos": true});
    let (status, a) = Server::start(&[]).post("/v1/completions", &body, None);
    assert_eq!(status, 200, "{a}");
    let spec = Server::start(&["--ngram-lookup", "3", "--max-draft-len", "4"]);
    let (status, b) = spec.post("/v1/completions", &body, None);
    assert_eq!(
        (status, &a["choices"][0]["text"]),
        (200, &b["choices"][0]["text"])
    );
    let drafted = spec.metric("trtllm_spec_decode_num_draft_tokens_total");
    let kept = spec.metric("trtllm_spec_decode_num_accepted_tokens_total");
    assert!(kept > 0.0 && kept <= drafted, "{kept} of {drafted}");
    assert!(spec.metric("trtllm_spec_decode_num_drafts_total") > 0.0);
}
