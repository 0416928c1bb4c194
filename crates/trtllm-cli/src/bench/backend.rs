//! Where benchmark requests run: the engine in this process (through the LLM API, as an
//! application would use it) or a `trtllm serve` over HTTP with streamed completions.

use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

use crate::run::{ExecutorArgs, ModelArg};
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use trtllm_api::executor::SpeculativeTotals;
use trtllm_api::{Prompt, SamplingParams, LLM};

use super::workload::{BenchRequest, Input};

/// One request's measurements.
#[derive(Clone, Debug)]
pub struct Timing {
    pub input_tokens: usize,
    pub output_tokens: usize,
    pub ttft: Duration,
    pub e2e: Duration,
    /// Gaps between successive streamed deltas.
    pub itl: Vec<Duration>,
}

pub trait Backend: Sync {
    fn run(&self, req: &BenchRequest) -> Result<Timing>;
    fn vocab_size(&self) -> usize;
    fn describe(&self) -> String;
    /// The executor's speculative-decoding totals, where the backend can see them.
    fn speculative(&self) -> Option<SpeculativeTotals> {
        None
    }
    /// Work done before the clock starts: the adapters the requests name are read and checked
    /// up front, as a server with `--lora-modules` has them before its first request.
    fn prepare(&self, _: &[BenchRequest]) -> Result<()> {
        Ok(())
    }
}

/// Records delta arrival times for one request.
struct Clock {
    start: Instant,
    first: Option<Duration>,
    last: Option<Instant>,
    itl: Vec<Duration>,
}

impl Clock {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            first: None,
            last: None,
            itl: Vec::new(),
        }
    }

    fn tick(&mut self) {
        let now = Instant::now();
        self.first.get_or_insert(now - self.start);
        if let Some(prev) = self.last.replace(now) {
            self.itl.push(now - prev);
        }
    }

    fn done(self, input_tokens: usize, output_tokens: usize) -> Timing {
        let e2e = self.start.elapsed();
        Timing {
            input_tokens,
            output_tokens,
            ttft: self.first.unwrap_or(e2e),
            e2e,
            itl: self.itl,
        }
    }
}

pub struct InProcess {
    llm: LLM,
    path: String,
}

impl InProcess {
    pub fn open(model: &ModelArg, executor: &ExecutorArgs) -> Result<Self> {
        Ok(Self {
            llm: crate::run::open(model, executor.config(), executor.device, None)?,
            path: model.path()?.display().to_string(),
        })
    }
}

impl Backend for InProcess {
    fn prepare(&self, requests: &[BenchRequest]) -> Result<()> {
        for lora in requests.iter().filter_map(|r| r.lora.as_ref()) {
            self.llm.executor().preload_lora(lora)?;
        }
        Ok(())
    }

    fn run(&self, req: &BenchRequest) -> Result<Timing> {
        let params = SamplingParams {
            max_tokens: req.output_tokens,
            ignore_eos: true,
            lora_request: req.lora.clone(),
            ..SamplingParams::default()
        };
        let prompt = match &req.input {
            Input::Ids(ids) => Prompt::TokenIds(ids.clone()),
            Input::Text(t) => Prompt::Text(t.clone()),
        };
        let mut clock = Clock::new();
        let mut stream = self.llm.generate_async(prompt, &params)?;
        let mut output_tokens = 0;
        while let Some(delta) = stream.next_delta() {
            let delta = delta?;
            if !delta.token_ids.is_empty() {
                clock.tick();
                output_tokens += delta.token_ids.len();
            }
        }
        Ok(clock.done(stream.prompt_token_ids().len(), output_tokens))
    }

    fn vocab_size(&self) -> usize {
        self.llm.executor().engine_config().model.vocab_size
    }

    fn describe(&self) -> String {
        format!("in-process {}", self.path)
    }

    fn speculative(&self) -> Option<SpeculativeTotals> {
        let load = self.llm.executor().load(Duration::from_secs(10)).ok()?;
        Some(load.speculative)
    }
}

pub struct HttpBackend {
    agent: ureq::Agent,
    base: String,
    model: String,
    api_key: Option<String>,
    vocab_size: usize,
}

impl HttpBackend {
    /// Reads the server's model list: the model to name and its vocabulary size.
    pub fn connect(url: &str, model: Option<String>, api_key: Option<String>) -> Result<Self> {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        let base = url.trim_end_matches('/').to_string();
        let mut req = agent.get(format!("{base}/v1/models"));
        if let Some(k) = &api_key {
            req = req.header("Authorization", format!("Bearer {k}"));
        }
        let mut resp = req
            .call()
            .with_context(|| format!("GET {base}/v1/models"))?;
        let body: Value = serde_json::from_str(&resp.body_mut().read_to_string()?)
            .with_context(|| format!("{base}/v1/models: not JSON"))?;
        if !resp.status().is_success() {
            bail!("{base}/v1/models: {} {body}", resp.status());
        }
        let card = &body["data"][0];
        Ok(Self {
            model: model
                .or_else(|| card["id"].as_str().map(String::from))
                .context("the server lists no model")?,
            vocab_size: card["vocab_size"].as_u64().unwrap_or(1024) as usize,
            agent,
            base,
            api_key,
        })
    }
}

impl Backend for HttpBackend {
    fn run(&self, req: &BenchRequest) -> Result<Timing> {
        let prompt = match &req.input {
            Input::Ids(ids) => json!(ids),
            Input::Text(t) => json!(t),
        };
        let body = json!({
            "model": self.model, "prompt": prompt, "max_tokens": req.output_tokens,
            "temperature": 0, "ignore_eos": true, "stream": true,
            "stream_options": {"include_usage": true},
        });
        let url = format!("{}/v1/completions", self.base);
        let mut http = self
            .agent
            .post(&url)
            .header("Content-Type", "application/json");
        if let Some(k) = &self.api_key {
            http = http.header("Authorization", format!("Bearer {k}"));
        }
        let mut clock = Clock::new();
        let mut resp = http
            .send(body.to_string())
            .with_context(|| format!("POST {url}"))?;
        if !resp.status().is_success() {
            bail!(
                "POST {url}: {} {}",
                resp.status(),
                resp.body_mut().read_to_string()?
            );
        }
        let mut usage = None;
        for line in BufReader::new(resp.body_mut().as_reader()).lines() {
            let line = line?;
            let Some(data) = line.strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                break;
            }
            let chunk: Value = serde_json::from_str(data).context("stream chunk is not JSON")?;
            if let Some(err) = chunk.get("error") {
                bail!("POST {url}: {err}");
            }
            if chunk["choices"].as_array().is_some_and(|c| !c.is_empty()) {
                clock.tick();
            }
            if !chunk["usage"].is_null() {
                usage = Some(chunk["usage"].clone());
            }
        }
        let usage = usage.context("the stream ended without a usage chunk")?;
        let count = |k: &str| usage[k].as_u64().unwrap_or(0) as usize;
        Ok(clock.done(count("prompt_tokens"), count("completion_tokens")))
    }

    fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    fn describe(&self) -> String {
        format!("{} ({})", self.base, self.model)
    }
}
