#!/usr/bin/env python3
"""Output tokens/s of N concurrent chat requests against a running `trtllm serve`, without and
with a JSON schema (response_format), to price structured output. Standard library only.

    python3 docs/bench/guided_throughput.py http://127.0.0.1:8000 [N] [MAX_TOKENS]

The schema's one string must be long (minLength), so constrained completions run to max_tokens
like the unconstrained ones (ignore_eos) and both produce the same number of tokens."""

import json
import sys
import threading
import time
import urllib.request

base = sys.argv[1]
n = int(sys.argv[2]) if len(sys.argv) > 2 else 32
max_tokens = int(sys.argv[3]) if len(sys.argv) > 3 else 128
schema = {"type": "object", "properties": {"story": {"type": "string", "minLength": 2000}},
          "required": ["story"], "additionalProperties": False}


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
plain, pt = run({"ignore_eos": True})
guided, gt = run({"response_format": {"type": "json_schema", "json_schema": {"schema": schema}}})
print(f"{n} concurrent x {max_tokens} tokens: plain {plain:.1f} tok/s ({pt} tokens), "
      f"JSON schema {guided:.1f} tok/s ({gt} tokens), ratio {guided / plain:.2f}")
