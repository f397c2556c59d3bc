"""Client-supplied ids never key shared state: concurrent requests that send the same
`X-Request-Id` and `user` each get their own output (the one they get alone), and the
header is echoed."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx

PROMPTS = ["The capital of France is", "def fibonacci(n):", "The three primary colors are",
           "List five fruits:\n1."]  # fmt: skip


def complete(base_url: str, prompt: str, stream: bool) -> tuple[str, str | None]:
    body = {"prompt": prompt, "max_tokens": 16, "temperature": 0, "user": "same-user",
            "stream": stream}  # fmt: skip
    headers = {"X-Request-Id": "same-id"}
    url = base_url + "/v1/completions"
    if not stream:
        resp = httpx.post(url, json=body, headers=headers, timeout=120)
        assert resp.status_code == 200, resp.text
        return resp.json()["choices"][0]["text"], resp.headers.get("X-Request-Id")
    texts = []
    with httpx.stream("POST", url, json=body, headers=headers, timeout=120) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                texts += [c["text"] for c in json.loads(line[6:])["choices"]]
        return "".join(texts), resp.headers.get("X-Request-Id")


def test_the_same_client_request_id_twice_at_once(server):
    alone = {p: complete(server.base_url, p, False)[0] for p in PROMPTS}
    jobs = [(p, stream) for p in PROMPTS for stream in (False, True)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda job: complete(server.base_url, *job), jobs))
    for (prompt, _), (text, echoed) in zip(jobs, results, strict=True):
        assert text == alone[prompt], prompt
        assert echoed == "same-id"
