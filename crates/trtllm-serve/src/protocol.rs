//! OpenAI request bodies and their translation into `SamplingParams` and prompts. Fields
//! OpenAI defines keep its defaults (temperature 1, max_tokens 16 for completions, the rest of
//! the context for chat); vLLM's extensions (top_k, min_p, repetition_penalty, min_tokens,
//! ignore_eos, stop_token_ids, skip_special_tokens) are accepted too. A field we do not
//! implement is refused by name, never accepted and ignored.

use serde::Deserialize;
use serde_json::{Map, Value};
use trtllm_api::{GuidedDecoding, Prompt, SamplingParams, ToolMode};

use crate::ServeError;

/// Fields that change nothing a server computes (OpenAI's bookkeeping): accepted.
const INERT: &[&str] = &["user", "store", "metadata", "service_tier"];

/// Fields OpenAI or vLLM define that this server does not implement.
const NOT_IMPLEMENTED: &[&str] = &[
    "functions",
    "function_call",
    "guided_decoding_backend",
    "best_of",
    "allowed_token_ids",
    "suffix",
    "logits_processors",
    "truncate_prompt_tokens",
    "reasoning_effort",
    "modalities",
    "audio",
    "prediction",
];

/// Refuses the fields no field of a request took (`extra`), naming the first; with `lenient`,
/// warns of each and goes on. A null value asks for nothing and passes. `at` prefixes the name
/// (`messages[2].`).
pub fn check_unknown(
    extra: &Map<String, Value>,
    at: &str,
    lenient: bool,
) -> Result<(), ServeError> {
    for (k, v) in extra {
        if v.is_null() || INERT.contains(&k.as_str()) {
            continue;
        }
        let field = format!("{at}{k}");
        let message = match NOT_IMPLEMENTED.contains(&k.as_str()) {
            true => format!("'{field}' is not supported by this server"),
            false => format!("unknown field '{field}'"),
        };
        if !lenient {
            return Err(ServeError::bad(message, Some(&field)));
        }
        tracing::warn!("{message}: ignored (--lenient-requests)");
    }
    Ok(())
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum PromptInput {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
    IdsBatch(Vec<Vec<u32>>),
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum StopInput {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Sampling fields shared by both endpoints. Integers are signed so a negative value is
/// reported against its field rather than as a JSON type error.
#[derive(Debug, Default, Deserialize)]
pub struct SamplingFields {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub seed: Option<u64>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub stop: Option<StopInput>,
    pub stop_token_ids: Option<Vec<u32>>,
    pub ignore_eos: Option<bool>,
    pub min_tokens: Option<i64>,
    pub n: Option<i64>,
    pub skip_special_tokens: Option<bool>,
    /// OpenAI's shape: token ids (as strings) to a bias in [−100, 100].
    pub logit_bias: Option<Map<String, Value>>,
    /// Structured output, as OpenAI (`response_format`) and vLLM (`structured_outputs`, and the
    /// older `guided_*` fields) spell it; at most one of them.
    pub response_format: Option<Value>,
    pub structured_outputs: Option<Map<String, Value>>,
    pub guided_json: Option<Value>,
    pub guided_regex: Option<String>,
    pub guided_grammar: Option<String>,
    pub guided_choice: Option<Vec<String>>,
    pub bad_words: Option<Vec<String>>,
    /// vLLM's: log-probabilities of the prompt's tokens, with this many alternatives.
    pub prompt_logprobs: Option<i64>,
    /// vLLM's beam search: the `n` best of `n` beams.
    pub use_beam_search: Option<bool>,
    pub length_penalty: Option<f32>,
    pub early_stopping: Option<trtllm_api::EarlyStopping>,
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    /// Optional: the served model when absent.
    pub model: Option<String>,
    pub prompt: PromptInput,
    pub max_tokens: Option<i64>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub logprobs: Option<i64>,
    #[serde(default)]
    pub echo: bool,
    #[serde(flatten)]
    pub sampling: SamplingFields,
    /// Every field the others did not take (declared last, so it gets only those).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A request reduced to what the engine needs.
pub struct Parsed<T> {
    /// `max_tokens` is a placeholder when `max_tokens` below is None.
    pub params: SamplingParams,
    /// Tokens asked for; None: what the context leaves after each prompt.
    pub max_tokens: Option<usize>,
    pub inputs: T,
    pub stream: bool,
    pub include_usage: bool,
    /// How the text becomes tool calls (chat with tools).
    pub tool_calls: Option<ToolCalls>,
    /// Completions with `echo`: each prompt's text (None: decode its token ids).
    pub echo: Option<Vec<Option<String>>>,
    /// Prompts in the request (each gets `n` sequences).
    pub prompts: usize,
}

/// A chat's tool calls: how they are read, and whether several may be made.
#[derive(Clone, Debug)]
pub struct ToolCalls {
    pub mode: ToolMode,
    pub parallel: bool,
}

pub(crate) fn count(v: Option<i64>, field: &str, min: i64) -> Result<Option<usize>, ServeError> {
    match v {
        Some(x) if x < min => Err(ServeError::bad(
            format!("{field} = {x}: expected an integer >= {min}"),
            Some(field),
        )),
        Some(x) => Ok(Some(x as usize)),
        None => Ok(None),
    }
}

/// vLLM's rule: prompt log-probabilities come with a whole response, not a stream.
pub(crate) fn no_prompt_logprobs_streamed(
    stream: bool,
    params: &SamplingParams,
) -> Result<(), ServeError> {
    match stream && params.prompt_logprobs.is_some() {
        true => Err(ServeError::bad(
            "prompt_logprobs is not available when streaming",
            Some("prompt_logprobs"),
        )),
        false => Ok(()),
    }
}

/// A schema given as JSON, or as a string holding it (vLLM takes both).
fn json_value(v: Value) -> Value {
    match v {
        Value::String(s) => serde_json::from_str(&s).unwrap_or(Value::String(s)),
        v => v,
    }
}

/// `{"token id": bias}` as (id, bias) pairs; the ranges are checked with the other parameters.
fn logit_bias(map: Map<String, Value>) -> Result<Vec<(u32, f32)>, ServeError> {
    let bad = |k: &str| {
        ServeError::bad(
            format!("logit_bias: '{k}' is not a token id mapped to a number"),
            Some("logit_bias"),
        )
    };
    map.iter()
        .map(|(k, v)| {
            let id = k.parse::<u32>().map_err(|_| bad(k))?;
            let b = v.as_f64().ok_or_else(|| bad(k))?;
            Ok((id, b as f32))
        })
        .collect()
}

impl SamplingFields {
    /// The one structured-output constraint the request gives, if any.
    fn guided(&mut self) -> Result<Option<GuidedDecoding>, ServeError> {
        let bad = |field: &str, m: String| ServeError::bad(format!("{field}: {m}"), Some(field));
        let mut given = Vec::new();
        if let Some(f) = self.response_format.take() {
            let kind = f.get("type").and_then(Value::as_str).unwrap_or("");
            match kind {
                "text" => {}
                "json_object" => given.push(("response_format", GuidedDecoding::JsonObject)),
                "json_schema" => {
                    let schema = f.pointer("/json_schema/schema").cloned().ok_or_else(|| {
                        bad("response_format", "json_schema.schema is missing".into())
                    })?;
                    given.push(("response_format", GuidedDecoding::JsonSchema(schema)));
                }
                other => {
                    return Err(bad(
                        "response_format",
                        format!("type '{other}' is not one of text, json_object, json_schema"),
                    ))
                }
            }
        }
        if let Some(s) = self.guided_json.take() {
            given.push(("guided_json", GuidedDecoding::JsonSchema(json_value(s))));
        }
        if let Some(r) = self.guided_regex.take() {
            given.push(("guided_regex", GuidedDecoding::Regex(r)));
        }
        if let Some(g) = self.guided_grammar.take() {
            given.push(("guided_grammar", GuidedDecoding::Grammar(g)));
        }
        if let Some(c) = self.guided_choice.take() {
            given.push(("guided_choice", GuidedDecoding::Choice(c)));
        }
        for (k, v) in self.structured_outputs.take().unwrap_or_default() {
            let text = |v: Value| v.as_str().map(String::from);
            let g = match (k.as_str(), v) {
                ("json", v) => Some(GuidedDecoding::JsonSchema(json_value(v))),
                ("json_object", Value::Bool(true)) => Some(GuidedDecoding::JsonObject),
                ("regex", v) => text(v).map(GuidedDecoding::Regex),
                ("grammar", v) => text(v).map(GuidedDecoding::Grammar),
                ("choice", Value::Array(a)) => {
                    a.iter().map(|c| c.as_str().map(String::from)).collect::<Option<_>>().map(GuidedDecoding::Choice)
                }
                (_, Value::Null) => None,
                (k, _) => {
                    return Err(bad(
                        "structured_outputs",
                        format!("'{k}' is not one of json, json_object, regex, grammar, choice (or not of its type)"),
                    ))
                }
            };
            given.extend(g.map(|g| ("structured_outputs", g)));
        }
        match given.len() {
            0 | 1 => Ok(given.pop().map(|(_, g)| g)),
            _ => Err(bad(
                given[1].0,
                format!("give one structured-output constraint, not {}", given.len()),
            )),
        }
    }

    /// Parameters with `max_tokens` and `logprobs` already resolved by the endpoint; the
    /// ranges are checked by `SamplingParams::validate`.
    pub(crate) fn params(
        mut self,
        max_tokens: usize,
        logprobs: Option<usize>,
    ) -> Result<SamplingParams, ServeError> {
        let d = SamplingParams::default();
        let guided_decoding = self.guided()?;
        let use_beam_search = self.use_beam_search.unwrap_or(false);
        let p = SamplingParams {
            max_tokens,
            min_tokens: count(self.min_tokens, "min_tokens", 0)?.unwrap_or(0),
            // OpenAI's default of 1 samples; a beam search draws nothing.
            temperature: self
                .temperature
                .unwrap_or(if use_beam_search { 0.0 } else { 1.0 }),
            top_k: match self.top_k {
                // vLLM's "disabled" spelling.
                Some(-1) => 0,
                k => count(k, "top_k", 0)?.unwrap_or(0),
            },
            top_p: self.top_p.unwrap_or(d.top_p),
            min_p: self.min_p.unwrap_or(d.min_p),
            seed: self.seed,
            repetition_penalty: self.repetition_penalty.unwrap_or(d.repetition_penalty),
            presence_penalty: self.presence_penalty.unwrap_or(0.0),
            frequency_penalty: self.frequency_penalty.unwrap_or(0.0),
            stop: match self.stop {
                None => Vec::new(),
                Some(StopInput::One(s)) => vec![s],
                Some(StopInput::Many(v)) => v,
            },
            stop_token_ids: self.stop_token_ids.unwrap_or_default(),
            ignore_eos: self.ignore_eos.unwrap_or(false),
            n: count(self.n, "n", 1)?.unwrap_or(1),
            logprobs,
            prompt_logprobs: count(self.prompt_logprobs, "prompt_logprobs", 0)?,
            // Vocabulary-wide rows have no place in OpenAI's responses.
            return_context_logits: false,
            return_generation_logits: false,
            skip_special_tokens: self.skip_special_tokens.unwrap_or(true),
            logit_bias: logit_bias(self.logit_bias.take().unwrap_or_default())?,
            guided_decoding,
            bad_words: self.bad_words.unwrap_or_default(),
            use_beam_search,
            beam_width: None,
            length_penalty: self.length_penalty.unwrap_or(d.length_penalty),
            early_stopping: self.early_stopping.unwrap_or_default(),
            lora_request: None,
        };
        p.validate()?;
        Ok(p)
    }
}

impl CompletionRequest {
    pub fn params(self, lenient: bool) -> Result<Parsed<Vec<Prompt>>, ServeError> {
        check_unknown(&self.extra, "", lenient)?;
        let max_tokens = count(self.max_tokens, "max_tokens", 1)?.unwrap_or(16);
        let logprobs = count(self.logprobs, "logprobs", 0)?;
        if self.echo && logprobs.is_some() && self.stream {
            return Err(ServeError::bad(
                "echo with logprobs is not supported when streaming",
                Some("echo"),
            ));
        }
        let prompts = match self.prompt {
            PromptInput::Text(t) => vec![Prompt::Text(t)],
            PromptInput::Texts(v) => v.into_iter().map(Prompt::Text).collect(),
            PromptInput::Ids(ids) => vec![Prompt::TokenIds(ids)],
            PromptInput::IdsBatch(v) => v.into_iter().map(Prompt::TokenIds).collect(),
        };
        if prompts.is_empty() {
            return Err(ServeError::bad("prompt is empty", Some("prompt")));
        }
        let include_usage = self.stream_options.is_some_and(|o| o.include_usage);
        let mut params = self.sampling.params(max_tokens, logprobs)?;
        if self.echo && logprobs.is_some() {
            // The echoed prompt's tokens carry log-probabilities too.
            params.prompt_logprobs = params.prompt_logprobs.max(logprobs);
        }
        let echo = self.echo.then(|| {
            let text = |p: &Prompt| match p {
                Prompt::Text(t) => Some(t.clone()),
                Prompt::TokenIds(_) => None,
            };
            prompts.iter().map(text).collect()
        });
        no_prompt_logprobs_streamed(self.stream, &params)?;
        Ok(Parsed {
            params,
            max_tokens: Some(max_tokens),
            echo,
            prompts: prompts.len(),
            inputs: prompts,
            stream: self.stream,
            include_usage,
            tool_calls: None,
        })
    }
}
