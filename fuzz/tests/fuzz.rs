//! Every loader and the request parser under 1,000 mutated inputs each (`TRTLLM_FUZZ_CASES`),
//! after replaying the corpus of past failures. One test, so the heap accounting sees one
//! target at a time.

use trtllm_fuzz::alloc::Counting;

#[global_allocator]
static HEAP: Counting = Counting;

#[test]
fn every_loader_and_the_request_parser_survive_mutated_input() {
    let scratch = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz");
    let failures = trtllm_fuzz::run(trtllm_fuzz::TARGETS, &trtllm_fuzz::ci_limits(), &scratch)
        .expect("targets start");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
