#!/usr/bin/env python3
"""Output tokens/s of N concurrent chat requests against a running `trtllm serve`, without and
with a JSON schema (response_format), to price structured output. Standard library only.

    python3 docs/bench/guided_throughput.py http://127.0.0.1:8000 [N] [MAX_TOKENS] [story|dense|greedy]

`story` (the default): one long string (minLength), where the mask is cheap. `dense`: an array
of small objects of bounded integers and enums, where nearly every token is structure and the
mask is recomputed in earnest. Both are long enough that constrained completions run to
max_tokens like the unconstrained ones (ignore_eos), so both produce the same number of tokens.
`greedy` compares no schema at temperature 0 instead: the price of sampling itself."""

import json
import sys
import threading
import time
import urllib.request

base = sys.argv[1]
n = int(sys.argv[2]) if len(sys.argv) > 2 else 32
max_tokens = int(sys.argv[3]) if len(sys.argv) > 3 else 128
kind = sys.argv[4] if len(sys.argv) > 4 else "story"
schemas = {
    "story": {"type": "object", "properties": {"story": {"type": "string", "minLength": 2000}},
              "required": ["story"], "additionalProperties": False},
    "dense": {"type": "array", "minItems": 200, "items": {
        "type": "object", "additionalProperties": False, "required": ["x", "y", "kind"],
        "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 99},
                       "y": {"type": "integer", "minimum": 0, "maximum": 99},
                       "kind": {"enum": ["a", "b", "c"]}}}},
}
schema = schemas.get(kind)


def post(body):
    req = urllib.request.Request(base + "/v1/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req) as r:
        return json.load(r)


def run(extra):
    results = [None] * n

    def one(i):
        body = {"messages": [{"role": "user", "content": f"Tell story number {i} as JSON."}],
                "max_tokens": max_tokens, "temperature": 0.8, "seed": i, **extra}
        results[i] = post(body)

    start = time.time()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.time() - start
    tokens = sum(r["usage"]["completion_tokens"] for r in results)
    return tokens / wall, tokens


post({"messages": [{"role": "user", "content": "warm up"}], "max_tokens": 4})
constrained = ({"ignore_eos": True, "temperature": 0} if kind == "greedy" else
               {"response_format": {"type": "json_schema", "json_schema": {"schema": schema}}})
# Alternated, best of three each: the host's noise hits both alike.
plain, guided = [], []
for _ in range(3):
    plain.append(run({"ignore_eos": True}))
    guided.append(run(constrained))
(p, pt), (g, gt) = max(plain), max(guided)
print(f"{n} concurrent x {max_tokens} tokens ({kind}): plain {p:.1f} tok/s ({pt} tokens), "
      f"{'greedy' if kind == 'greedy' else 'JSON schema'} {g:.1f} tok/s ({gt} tokens), ratio {g / p:.2f}")
