//! The demo model end to end through the binary: build from GGUF, generate, perplexity.

use std::process::Command;

use trtllm_tests::{fixtures, read_json, smollm2_gguf, SmolGolden};

fn trtllm(args: &[&str]) -> String {
    trtllm_with_stdin(args, "")
}

/// The demo model built by `trtllm build` into `engine` under a fresh temporary directory.
fn built() -> (tempfile::TempDir, std::path::PathBuf) {
    let gguf = smollm2_gguf().expect("demo model");
    let t = tempfile::tempdir().unwrap();
    let engine = t.path().join("engine");
    let out = engine.to_str().unwrap();
    trtllm(&[
        "build",
        "--checkpoint",
        gguf.to_str().unwrap(),
        "--output",
        out,
    ]);
    (t, engine)
}

#[test]
fn build_run_and_perplexity() {
    let golden: SmolGolden = read_json(&fixtures().join("smollm2-135m-instruct.json")).unwrap();
    let (t, engine) = built();
    let e = engine.to_str().unwrap();

    let text = trtllm(&[
        "run",
        "--engine",
        e,
        "--prompt",
        "The capital of France is",
        "--max-tokens",
        "48",
    ]);
    assert_eq!(text, " Paris.\n\nThe answer is: 2018-01-22 12:12:53.\n");
    let chat = trtllm(&[
        "run",
        "--engine",
        e,
        "--chat",
        "What is the capital of France?",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&chat).unwrap();
    assert_eq!(v["outputs"][0]["text"], "The capital of France is Paris.");
    assert_eq!(v["outputs"][0]["finish_reason"], "stop");

    // Several prompts at once: two flags and a file, one RequestOutput per line, in order;
    // each is the golden greedy continuation cut at --max-tokens.
    let raw: Vec<_> = golden.cases.iter().filter(|c| c.kind == "raw").collect();
    let prompts_file = t.path().join("prompts.txt");
    let rest: Vec<&str> = raw[2..]
        .iter()
        .map(|c| c.prompt.as_deref().unwrap())
        .collect();
    std::fs::write(&prompts_file, rest.join("\n\n")).unwrap();
    let out = trtllm(&[
        "run",
        "--engine",
        e,
        "--prompt",
        raw[0].prompt.as_deref().unwrap(),
        "--prompt",
        raw[1].prompt.as_deref().unwrap(),
        "--prompts-file",
        prompts_file.to_str().unwrap(),
        "--max-tokens",
        "6",
        "--max-batch-size",
        "2",
        "--json",
    ]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), raw.len(), "{out}");
    for (line, case) in lines.iter().zip(&raw) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["prompt"].as_str(), case.prompt.as_deref());
        let want = &case.greedy_ids[..case.greedy_ids.len().min(6)];
        assert_eq!(
            v["outputs"][0]["token_ids"],
            serde_json::json!(want),
            "{line}"
        );
    }

    let ids_file = t.path().join("ids.txt");
    let ids: Vec<String> = golden
        .perplexity
        .input_ids
        .iter()
        .map(u32::to_string)
        .collect();
    std::fs::write(&ids_file, ids.join(" ")).unwrap();
    let out = trtllm(&[
        "perplexity",
        "--engine",
        e,
        "--input-ids-file",
        ids_file.to_str().unwrap(),
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let nll = v["mean_nll"].as_f64().unwrap();
    assert_eq!(v["tokens"], 1023);
    assert!(
        (nll - golden.perplexity.mean_nll).abs() / golden.perplexity.mean_nll < 2e-3,
        "mean NLL {nll}"
    );
    eprintln!("perplexity: {out}");
}

/// `trtllm run FILE.gguf` builds an engine that keeps the file's quantization, once (a stable
/// cache key, a lock between processes), says so once on stderr, and generates the golden text.
#[test]
fn running_a_gguf_keeps_its_quantization_and_says_once_what_it_built() {
    let gguf = smollm2_gguf().expect("demo model");
    let cache = tempfile::tempdir().unwrap();
    let start = || {
        Command::new(env!("CARGO_BIN_EXE_trtllm"))
            .env("TRTLLM_CACHE", cache.path())
            .args(["run", "--engine", gguf.to_str().unwrap()])
            .args(["--prompt", "The capital of France is", "--max-tokens", "8"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run trtllm")
    };
    let finish = |child: std::process::Child| {
        let out = child.wait_with_output().expect("trtllm output");
        let text = |b: Vec<u8>| String::from_utf8(b).expect("utf-8");
        let err = text(out.stderr);
        assert!(out.status.success(), "{err}");
        (text(out.stdout), err)
    };
    // Two at once: one builds (under the lock), the other waits and finds it built.
    let (a, b) = (start(), start());
    let ((first, said_a), (other, said_b)) = (finish(a), finish(b));
    assert_eq!(first, other);
    let said = [said_a, said_b];
    let builds = said
        .iter()
        .filter(|s| s.contains("built an engine"))
        .count();
    assert_eq!(builds, 1, "{said:?}");
    assert!(said.iter().any(|s| s.contains("kept")), "{said:?}");
    // The golden greedy continuation, cut at 8 tokens.
    let golden = " Paris.\n\nThe answer is: 2018-01-22 12:12:53.";
    let got = first.trim_end_matches('\n');
    assert!(got.len() > 10 && golden.starts_with(got), "{first:?}");
    let (again, said) = finish(start());
    assert_eq!(again, first);
    assert!(!said.contains("built"), "built twice: {said}");

    let engines: Vec<_> = std::fs::read_dir(cache.path().join("engines"))
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    assert_eq!(engines.len(), 1, "{engines:?}");
    let config = std::fs::read_to_string(engines[0].join("config.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&config).unwrap();
    assert_eq!(v["build"]["keep_quantized"], true);
}

fn trtllm_with_stdin(args: &[&str], stdin: &str) -> String {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_trtllm"))
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run trtllm");
    let mut input = child.stdin.take().expect("stdin");
    input.write_all(stdin.as_bytes()).expect("write stdin");
    drop(input);
    let out = child.wait_with_output().expect("trtllm output");
    assert!(
        out.status.success(),
        "trtllm {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// The model as the first argument or --model / --engine; negative numbers as values;
/// prompts from stdin; log-probabilities in text mode; and `trtllm chat`, a conversation whose
/// second answer sees the first exchange.
#[test]
fn chat_repl_stdin_prompts_logprobs_and_the_model_argument() {
    let (_t, engine) = built();
    let e = engine.to_str().unwrap();

    let args = ["--prompt", "The capital of France is", "--max-tokens", "8"];
    let positional = trtllm(&[&["run", e][..], &args].concat());
    assert_eq!(
        positional,
        trtllm(&[&["run", "--model", e][..], &args].concat())
    );
    assert_eq!(
        positional,
        trtllm(&[&["run", "--engine", e][..], &args].concat())
    );
    trtllm(&[&["run", e, "--frequency-penalty", "-0.5"][..], &args].concat());

    let from_stdin = trtllm_with_stdin(
        &[
            "run",
            e,
            "--prompts-file",
            "-",
            "--max-tokens",
            "4",
            "--json",
        ],
        "The capital of France is\n\nWater is\n",
    );
    assert_eq!(from_stdin.lines().count(), 2, "{from_stdin}");

    let with_logprobs = trtllm(&[&["run", e, "--logprobs", "2"][..], &args].concat());
    // The text (with its own newlines), then a row per token.
    let lines: Vec<&str> = with_logprobs.lines().collect();
    let rows = &lines[lines.len() - 8..];
    for (i, row) in rows.iter().enumerate() {
        assert!(row.starts_with(&format!("{i:4} ")), "{with_logprobs}");
    }
    assert!(rows[0].contains("\" Paris\""), "{with_logprobs}");

    let (q1, q2) = ("What is the capital of France?", "And of Italy?");
    let out = trtllm_with_stdin(&["chat", e], &format!("{q1}\n{q2}\n"));
    let llm = trtllm_api::LLM::new(trtllm_api::LlmArgs {
        model: engine.clone(),
        ..Default::default()
    })
    .unwrap();
    let params = trtllm_api::SamplingParams {
        max_tokens: 64,
        ..Default::default()
    };
    let user = |q: &str| trtllm_api::ChatMessage::new("user", q);
    let mut history = vec![user(q1)];
    let a1 = llm.chat(&history, &params).unwrap().outputs[0].text.clone();
    assert_eq!(a1, "The capital of France is Paris.");
    history.extend([trtllm_api::ChatMessage::new("assistant", &a1), user(q2)]);
    let a2 = llm.chat(&history, &params).unwrap().outputs[0].text.clone();
    assert_eq!(out, format!("> {a1}\n> {a2}\n> \n"));

    // A system message: `run --chat --system` and the REPL's first answer agree with the API.
    let system = "You answer in French.";
    let messages = [trtllm_api::ChatMessage::new("system", system), user(q1)];
    let want = llm.chat(&messages, &params).unwrap().outputs[0]
        .text
        .clone();
    let run = trtllm(&["run", e, "--chat", q1, "--system", system]);
    assert_eq!(run, format!("{want}\n"));
    let repl = trtllm_with_stdin(&["chat", e, "--system", system], &format!("{q1}\n"));
    assert_eq!(repl, format!("> {want}\n> \n"));

    chat_at_a_terminal(e, q1, &a1);
}

/// `trtllm chat` at a terminal (a pty): line editing with history, so after /reset two up
/// arrows bring back the first question, which gets the first answer again; Ctrl-D ends the
/// session and the history is kept for the next one.
fn chat_at_a_terminal(engine: &str, q1: &str, a1: &str) {
    let cache = tempfile::tempdir().unwrap();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_trtllm"));
    cmd.args(["chat", engine]).env("TRTLLM_CACHE", cache.path());
    let mut p = rexpect::session::spawn_command(cmd, Some(60_000)).unwrap();
    p.exp_string("> ").unwrap();
    p.send_line(q1).unwrap();
    p.exp_string(a1).unwrap();
    p.exp_string("> ").unwrap();
    p.send_line("/reset").unwrap();
    p.exp_string("> ").unwrap();
    // One key at a time, as typed: each brings back an older line.
    p.send("\x1b[A").unwrap();
    p.flush().unwrap();
    p.exp_string("/reset").unwrap();
    p.send("\x1b[A").unwrap();
    p.flush().unwrap();
    p.exp_string(q1).unwrap();
    p.send_line("").unwrap();
    p.exp_string(a1).unwrap();
    p.exp_string("> ").unwrap();
    p.send_control('d').unwrap();
    p.exp_eof().unwrap();
    let history = std::fs::read_to_string(cache.path().join("chat_history.txt")).unwrap();
    assert!(
        history.contains(q1) && history.contains("/reset"),
        "{history}"
    );
}
