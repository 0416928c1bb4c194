//! How `trtllm serve` stops: SIGTERM on a lone server lets the responses already open finish,
//! then the process exits cleanly. (Under `mpirun`, where a signal means the job is being torn
//! down, open responses fail with an error instead: `tests/mpi_jobs.rs`.)

mod common;

use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{stream_at, Server, MODEL};
use serde_json::json;

#[test]
fn sigterm_lets_open_responses_finish_then_exits_cleanly() {
    let mut server = Server::start(&[]);
    let base = server.base.clone();
    let tokens = 300;
    let body = json!({"model": MODEL, "prompt": "The assert statement is", "max_tokens": tokens,
                      "temperature": 0, "ignore_eos": true, "stream": true,
                      "stream_options": {"include_usage": true}});
    let (started, first) = mpsc::channel();
    let client = std::thread::spawn(move || {
        // The server is signalled while this stream is open (its prefill is under way).
        let _ = started.send(());
        stream_at(&base, &body)
    });
    first.recv().expect("client started");
    std::thread::sleep(Duration::from_millis(300));
    let signalled = Instant::now();
    let killed = Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let (text, finish) = client.join().expect("client");
    assert_eq!(finish, "length", "the open stream ran to its end: {text:?}");
    let status = loop {
        if let Some(s) = server.child.try_wait().expect("wait") {
            break s;
        }
        assert!(
            signalled.elapsed() < Duration::from_secs(30),
            "still running 30 s after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
}
