"""Drives `trtllm serve` with the real `openai` client and checks it against transformers'
golden outputs. Usage: openai_client.py CASES.json (written by tests/server.rs): base_url,
api_key, model, and the golden cases (input ids, greedy ids and text, chat messages)."""

import json
import sys

import jsonschema
import openai

spec = json.load(open(sys.argv[1]))
client = openai.OpenAI(base_url=spec["base_url"], api_key=spec["api_key"], max_retries=0)
model = spec["model"]
keep_special = {"skip_special_tokens": False}
checks = 0


def check(cond, what):
    global checks
    checks += 1
    if not cond:
        raise AssertionError(what)


def expected_finish(case):
    return "stop" if case["greedy_ids"][-1] == spec["eos_token_id"] else "length"


def golden_text(case):
    """The golden text (transformers decoded every id) less the end-of-sequence token that ends
    a completion, which, as in vLLM, is never part of its text."""
    text = case["greedy_text"]
    return text.removesuffix(spec["eos_text"]) if expected_finish(case) == "stop" else text


def completion(case, **kw):
    return client.completions.create(
        model=model, prompt=case["prompt"], max_tokens=len(case["greedy_ids"]),
        temperature=0, extra_body=keep_special, **kw)


def streamed_completion(case, **kw):
    parts, finish, usage = {}, {}, None
    for chunk in completion(case, stream=True, stream_options={"include_usage": True}, **kw):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            parts[c.index] = parts.get(c.index, "") + c.text
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    return parts, finish, usage


check(any(m.id == model for m in client.models.list().data), "model listed")

raw = [c for c in spec["cases"] if c["kind"] == "raw"]
chat = [c for c in spec["cases"] if c["kind"] == "chat"]
for i, case in enumerate(raw):
    r = completion(case)
    text = r.choices[0].text
    check(text == golden_text(case), f"raw {i}: {text!r} != golden {golden_text(case)!r}")
    check(r.choices[0].finish_reason == expected_finish(case), f"raw {i}: finish_reason")
    check(r.usage.prompt_tokens == len(case["input_ids"]), f"raw {i}: prompt_tokens {r.usage}")
    check(r.usage.completion_tokens == len(case["greedy_ids"]), f"raw {i}: completion_tokens")
    check(r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens, "total")
    parts, finish, usage = streamed_completion(case)
    check(parts == {0: text}, f"raw {i}: streamed {parts!r} != {text!r}")
    check(finish == {0: r.choices[0].finish_reason}, f"raw {i}: streamed finish_reason")
    check(usage is not None and usage.completion_tokens == r.usage.completion_tokens, "stream usage")

for i, case in enumerate(chat):
    kw = dict(model=model, messages=case["messages"], max_tokens=len(case["greedy_ids"]),
              temperature=0, extra_body=keep_special)
    r = client.chat.completions.create(**kw)
    content = r.choices[0].message.content
    check(r.choices[0].message.role == "assistant", "role")
    check(content == golden_text(case), f"chat {i}: {content!r} != golden {golden_text(case)!r}")
    check(r.usage.prompt_tokens == len(case["input_ids"]), f"chat {i}: prompt_tokens {r.usage}")
    check(r.usage.completion_tokens == len(case["greedy_ids"]), f"chat {i}: completion_tokens")
    streamed, roles, usage = "", 0, None
    for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            roles += c.delta.role == "assistant"
            streamed += c.delta.content or ""
    check(streamed == content, f"chat {i}: streamed {streamed!r} != {content!r}")
    check(roles == 1, "one role delta")
    check(usage.completion_tokens == r.usage.completion_tokens, "chat stream usage")

# A stop string from the middle of the golden text, matched across token boundaries.
case = raw[0]
golden = golden_text(case)
stop = golden[len(golden) // 2: len(golden) // 2 + 4]
want = golden[: golden.find(stop)]
r = completion(case, stop=[stop])
check(r.choices[0].text == want, f"stop {stop!r}: {r.choices[0].text!r} != {want!r}")
check(r.choices[0].finish_reason == "stop", "stop: finish_reason")
parts, finish, _ = streamed_completion(case, stop=stop)
check(parts == {0: want} and finish == {0: "stop"}, f"streamed stop: {parts!r} {finish!r}")

# n = 2: greedy choices are both the golden text; sampled ones are two valid choices.
r = completion(case, n=2)
check(sorted(c.index for c in r.choices) == [0, 1], "n=2 indices")
check(all(c.text == golden for c in r.choices), "n=2 greedy choices")
check(r.usage.completion_tokens == 2 * len(case["greedy_ids"]), "n=2 usage")
r = client.chat.completions.create(model=model, messages=chat[0]["messages"], max_tokens=12,
                                   temperature=1.0, seed=3, n=2)
check(len(r.choices) == 2 and all(c.message.content for c in r.choices), "chat n=2")
parts, finish, usage = streamed_completion(case, n=2)
check(parts == {0: golden, 1: golden}, f"streamed n=2: {parts!r}")

# Log-probabilities: one entry per token, the greedy token is the most likely one.
r = completion(case, logprobs=3)
lp = r.choices[0].logprobs
check(len(lp.tokens) == len(case["greedy_ids"]) == len(lp.token_logprobs), "logprobs length")
check(all(len(t) <= 3 for t in lp.top_logprobs), "top_logprobs size")
check(all(abs(max(t.values()) - l) < 1e-5 for t, l in zip(lp.top_logprobs, lp.token_logprobs)),
      "greedy token has the top logprob")
r = client.chat.completions.create(model=model, messages=chat[0]["messages"], max_tokens=4,
                                   temperature=0, logprobs=True, top_logprobs=2)
content = r.choices[0].logprobs.content
check(len(content) == 4 and all(len(c.top_logprobs) == 2 for c in content), "chat logprobs")

# Structured output: every completion under a JSON schema validates, streamed and not, sampled
# with n = 2. Strings and numbers are bounded so no completion can be cut by max_tokens.
S = {"type": "string", "maxLength": 12}
I = {"type": "integer", "minimum": -1000, "maximum": 1000}
schemas = [
    {"type": "object", "properties": {"name": S, "age": I}, "required": ["name", "age"],
     "additionalProperties": False},
    {"type": "object", "properties": {"user": {"type": "object", "properties": {"id": I, "nick": S},
                                                "required": ["id", "nick"], "additionalProperties": False}},
     "required": ["user"], "additionalProperties": False},
    {"type": "array", "items": I, "minItems": 2, "maxItems": 4},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"],
     "additionalProperties": False},
    {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
     "required": ["zip"], "additionalProperties": False},
    {"type": "object", "properties": {"note": {"anyOf": [S, {"type": "null"}]}}, "required": ["note"],
     "additionalProperties": False},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "score": {"type": "number", "minimum": 0,
                                                                            "maximum": 1}},
     "required": ["ok", "score"], "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["a", "b", "c"]},
                                               "minItems": 1, "maxItems": 3}},
     "required": ["tags"], "additionalProperties": False},
    {"type": "object", "properties": {"points": {"type": "array", "maxItems": 2, "items": {
        "type": "object", "properties": {"x": I, "y": I}, "required": ["x", "y"],
        "additionalProperties": False}}}, "required": ["points"], "additionalProperties": False},
    {"type": "object", "properties": {"kind": {"const": "event"}, "when": {"type": "string",
                                                                         "pattern": "^20[0-9]{2}-[01][0-9]$"}},
     "required": ["kind", "when"], "additionalProperties": False},
]
for k, schema in enumerate(schemas):
    fmt = {"type": "json_schema", "json_schema": {"name": f"s{k}", "schema": schema, "strict": True}}
    kw = dict(model=model, messages=[{"role": "user", "content": "Reply with JSON."}],
              max_tokens=300, temperature=0.8, seed=k, response_format=fmt)
    r = client.chat.completions.create(n=2, **kw)
    texts = [c.message.content for c in r.choices]
    streamed = ""
    for chunk in client.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            streamed += c.delta.content or ""
    for text in texts + [streamed]:
        try:
            jsonschema.validate(json.loads(text), schema)
            check(True, "")
        except (ValueError, jsonschema.ValidationError) as e:
            check(False, f"schema {k}: {text!r}: {e}")
r = client.chat.completions.create(model=model, messages=chat[0]["messages"], max_tokens=20,
                                   temperature=0.8, n=2, extra_body={"guided_regex": "[0-9]{3}-[0-9]{4}"})
check(all(len(c.message.content) == 8 and c.message.content[3] == "-" for c in r.choices), "regex")
r = client.chat.completions.create(model=model, messages=chat[0]["messages"], max_tokens=20,
                                   temperature=0.8, n=2, extra_body={"guided_choice": ["left", "right"]})
check(all(c.message.content in ("left", "right") for c in r.choices), "choice")
try:
    client.chat.completions.create(model=model, messages=chat[0]["messages"], response_format={
        "type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "nope"}}})
    check(False, "a bad schema should fail")
except openai.BadRequestError as e:
    check("invalid JSON schema" in e.body["message"], f"bad schema: {e.body}")

# Tool calling, through a template that shows tools (given per request, as vLLM allows): a
# forced call (required, or a named function) always parses and validates against its
# function's parameters, streamed and not, sampled with n = 2.
tools_template = {"chat_template": open(spec["tools_template"]).read()}
tools = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
     "parameters": {"type": "object", "properties": {"city": S, "unit": {"enum": ["celsius", "fahrenheit"]}},
                    "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "add", "description": "Add two integers",
     "parameters": {"type": "object", "properties": {"a": I, "b": I}, "required": ["a", "b"],
                    "additionalProperties": False}}},
]
params_of = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
ask = [{"role": "user", "content": "What is the weather in Paris, and what is 2 + 3?"}]


def check_calls(calls, what, names=None, count=None):
    check(calls, f"{what}: no tool calls")
    check(count is None or len(calls) == count, f"{what}: {len(calls)} calls, expected {count}")
    for c in calls:
        check(c["name"] in (names or params_of), f"{what}: unknown function {c['name']}")
        check(c["id"], f"{what}: call without id")
        try:
            jsonschema.validate(json.loads(c["arguments"]), params_of[c["name"]])
        except (ValueError, jsonschema.ValidationError) as e:
            check(False, f"{what}: {c}: {e}")


def tool_calls_streamed(**kw):
    calls, finish = {}, None
    for chunk in client.chat.completions.create(stream=True, **kw):
        for ch in chunk.choices:
            for d in ch.delta.tool_calls or []:
                c = calls.setdefault(d.index, {"id": "", "name": "", "arguments": ""})
                c["id"] += d.id or ""
                c["name"] += (d.function.name or "") if d.function else ""
                c["arguments"] += (d.function.arguments or "") if d.function else ""
            finish = ch.finish_reason or finish
    return [calls[i] for i in sorted(calls)], finish


def as_dicts(message):
    return [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
            for c in message.tool_calls or []]


forced = [("required", None, "tool_calls"),
          ({"type": "function", "function": {"name": "add"}}, ["add"], "stop")]
for choice, names, reason in forced:
    kw = dict(model=model, messages=ask, tools=tools, tool_choice=choice, max_tokens=200,
              temperature=0.8, seed=3, extra_body=tools_template)
    r = client.chat.completions.create(n=2, **kw)
    for c in r.choices:
        check_calls(as_dicts(c.message), f"{choice}", names, 1 if names else None)
        check(c.finish_reason == reason, f"{choice}: finish_reason {c.finish_reason}")
    calls, finish = tool_calls_streamed(**kw)
    check_calls(calls, f"{choice} streamed", names, 1 if names else None)
    check(finish == reason, f"{choice} streamed: finish_reason {finish}")
r = client.chat.completions.create(model=model, messages=ask, tools=tools, tool_choice="required",
                                   parallel_tool_calls=False, max_tokens=200, extra_body=tools_template)
check_calls(as_dicts(r.choices[0].message), "one call", None, 1)
# The model decides under auto: whatever it wrote parses into content and valid calls.
r = client.chat.completions.create(model=model, messages=ask, tools=tools, max_tokens=100,
                                   temperature=0, extra_body=tools_template)
m = r.choices[0].message
check(m.content or m.tool_calls, "auto: content or calls")
# A conversation with an earlier call and its result renders and continues.
history = ask + [{"role": "assistant", "content": None, "tool_calls": [
    {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": "{\"a\": 2, \"b\": 3}"}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "5"}]
r = client.chat.completions.create(model=model, messages=history, tools=tools, tool_choice="none",
                                   max_tokens=20, temperature=0, extra_body=tools_template)
check(r.choices[0].message.content and not r.choices[0].message.tool_calls, "after a tool result")
for bad, where in [(dict(tool_choice={"type": "function", "function": {"name": "nope"}}, extra_body=tools_template), "add"),
                   (dict(tool_choice="required"), "does not show tools")]:
    try:
        client.chat.completions.create(model=model, messages=ask, tools=tools, max_tokens=8, **bad)
        check(False, f"{bad} should fail")
    except openai.BadRequestError as e:
        check(where in e.body["message"], f"{bad}: {e.body}")

# Errors arrive as the client's typed exceptions.
for exc, kw in [(openai.NotFoundError, dict(model="no-such-model")),
                (openai.BadRequestError, dict(model=model, max_tokens=-1)),
                (openai.BadRequestError, dict(model=model, top_p=2.0))]:
    try:
        client.completions.create(prompt="x", **{"max_tokens": 4, **kw})
        check(False, f"{kw} should fail")
    except exc as e:
        check(e.body and "message" in e.body, f"{kw}: OpenAI error body {e.body}")
bad = openai.OpenAI(base_url=spec["base_url"], api_key="wrong", max_retries=0)
try:
    bad.models.list()
    check(False, "wrong key accepted")
except openai.AuthenticationError:
    pass

print(f"openai {openai.__version__}: {checks} checks passed")
