"""`meshtron serve` end to end on a tiny random model: the openai client, streaming, 20 concurrent
requests against direct greedy generation, logprobs against the model's own log-softmax, the API
key, docs/inference.md's client example, and request validation (the server keeps serving)."""

import json
import os
import re
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

MODEL_NAME = "smollm2"  # the name docs/inference.md's example serves and asks for
MAX_MODEL_LEN = 256
API_KEY = "test-key-0123"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(model_dir, *args):
    """`meshtron serve --model MODEL_DIR ARGS` on a free port, with API_KEY: its base URL once healthy."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshtron", "serve", "--model", str(model_dir), "--port", str(port), *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ, MESHTRON_API_KEY=API_KEY),
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"server did not start:\n{proc.stdout.read()}")
        time.sleep(0.3)
    try:
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    with serving(tiny_llama_dir, "--served-model-name", MODEL_NAME, "--max-model-len", str(MAX_MODEL_LEN),
                 "--max-tokens", "64", "--dtype", "float32") as base:
        yield base


@pytest.fixture(scope="module")
def loaded(tiny_llama_dir):
    from meshtron.infer.loading import load_for_generation

    return load_for_generation(str(tiny_llama_dir), dtype="float32")


def _prompt_ids(loaded, messages=None, prompt=None):
    from meshtron.infer.loading import encode_messages

    return encode_messages(loaded.tokenizer, messages) if messages else loaded.tokenizer(prompt)["input_ids"]


@pytest.fixture(scope="module")
def direct(loaded):
    """Greedy generation in this process, one prompt at a time: what the server must return."""
    from meshtron.infer.generation import SamplingParams, generate_text

    def run(max_tokens: int, messages=None, prompt=None):
        params = SamplingParams(max_new_tokens=max_tokens, stop_token_ids=loaded.stop_token_ids)
        return generate_text(loaded.model, loaded.tokenizer, [_prompt_ids(loaded, messages, prompt)], params)[0]

    return run


def _client(base, api_key=API_KEY):
    return openai.OpenAI(base_url=f"{base}/v1", api_key=api_key, max_retries=0)


def _post(base, path, body, **kw):
    return httpx.post(f"{base}{path}", json=body, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60, **kw)


def test_openai_client_chat_completion_and_stream(server, direct):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there!"}]
    expected = direct(12, messages=messages)
    client = _client(server)
    reply = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=12, temperature=0)
    assert reply.choices[0].message.content == expected.text
    assert reply.choices[0].finish_reason == expected.finish_reason
    assert reply.usage.completion_tokens == len(expected.token_ids)

    stream = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == expected.finish_reason
    assert chunks[-1].usage.completion_tokens == len(expected.token_ids)


def test_completions_endpoint_plain_and_stream(server, direct):
    expected = direct(10, prompt="Once upon a time")
    client = _client(server)
    reply = client.completions.create(model=MODEL_NAME, prompt="Once upon a time", max_tokens=10, temperature=0)
    assert reply.choices[0].text == expected.text
    stream = client.completions.create(model=MODEL_NAME, prompt="Once upon a time", max_tokens=10, temperature=0,
                                       stream=True)
    assert "".join(c.choices[0].text for c in stream) == expected.text


@pytest.mark.slow  # a second server start, and a generate run
def test_a_deepseek_v3_model_serves_what_generate_prints(tiny_deepseek_dir):
    """Latent attention and MoE layers behind the server: its greedy completion is `meshtron generate`'s."""
    prompt = "The capital of France is"
    generate = subprocess.run([sys.executable, "-m", "meshtron", "generate", "--model", str(tiny_deepseek_dir),
                               "--prompt", prompt, "--max-new-tokens", "8"], capture_output=True, text=True,
                              timeout=300, check=False)
    assert generate.returncode == 0, generate.stderr[-3000:]
    with serving(tiny_deepseek_dir, "--served-model-name", "deepseek") as base:
        reply = _client(base).completions.create(model="deepseek", prompt=prompt, max_tokens=8, temperature=0)
    assert reply.choices[0].text.strip() == generate.stdout.strip() != ""


def test_models_and_health(server):
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}
    assert [m.id for m in _client(server).models.list().data] == [MODEL_NAME]


def test_api_key_is_required_on_the_api_but_not_on_health(server):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        response = httpx.post(f"{server}/v1/chat/completions", json=body, headers=headers, timeout=30)
        assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and error["code"] == "invalid_api_key"
        assert "API key" in error["message"]
    assert httpx.get(f"{server}/v1/models", timeout=30).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        _client(server, api_key="wrong").models.list()
    assert _post(server, "/v1/chat/completions", body).status_code == 200
    assert httpx.get(f"{server}/health", timeout=30).status_code == 200


def test_a_public_address_without_a_key_is_warned_about(tiny_llama_dir):
    env = {k: v for k, v in os.environ.items() if k != "MESHTRON_API_KEY"}
    proc = subprocess.Popen([sys.executable, "-m", "meshtron", "serve", "--model", str(tiny_llama_dir), "--host",
                             "0.0.0.0", "--port", str(_free_port())], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    try:
        first = proc.stdout.readline()  # the warning comes before the model loads
    finally:
        proc.kill()
        proc.wait()
    assert "without an API key" in first and "MESHTRON_API_KEY" in first


def _reference_logprobs(loaded, prompt_ids, generated_ids, k):
    """The model's own log-softmax over its logits for each generated token, and the k most likely."""
    import torch

    with torch.no_grad():
        logits = loaded.model(torch.tensor([prompt_ids + generated_ids]))[0].float()
    logprobs = logits.log_softmax(-1)[len(prompt_ids) - 1 : -1]
    chosen = logprobs.gather(1, torch.tensor(generated_ids)[:, None]).squeeze(1).tolist()
    top_values, top_ids = logprobs.topk(k, dim=-1)
    decode = lambda t: loaded.tokenizer.decode([t])  # noqa: E731
    return ([decode(t) for t in generated_ids], chosen,
            [[(decode(t), v) for t, v in zip(ids, values)]
             for ids, values in zip(top_ids.tolist(), top_values.tolist())])


def test_chat_logprobs_are_the_models_log_softmax(server, loaded, direct):
    messages = [{"role": "user", "content": "Tell me a story."}]
    expected = direct(8, messages=messages)
    tokens, chosen, top = _reference_logprobs(loaded, _prompt_ids(loaded, messages), expected.token_ids, 3)
    client = _client(server)
    reply = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=8, temperature=0,
                                           logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert [c.token for c in content] == tokens
    assert [c.logprob for c in content] == pytest.approx(chosen, abs=1e-4)
    assert [c.bytes for c in content] == [list(t.encode()) for t in tokens]
    assert [[t.token for t in c.top_logprobs] for c in content] == [[t for t, _ in row] for row in top]
    assert [t.logprob for c in content for t in c.top_logprobs] == pytest.approx(
        [v for row in top for _, v in row], abs=1e-4)
    # Streaming carries the same entries, each with the chunk its token completes.
    stream = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=8, temperature=0,
                                            logprobs=True, top_logprobs=3, stream=True)
    streamed = [e for c in stream if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    # The same tokens; the values to float32 rounding, since under continuous batching each decode step
    # may run in a batch of another size (other requests on the server) and matmuls round per shape.
    assert [e.token for e in streamed] == [c.token for c in content]
    assert [e.logprob for e in streamed] == pytest.approx([c.logprob for c in content], abs=1e-5)
    # Without top_logprobs: the chosen tokens only; without logprobs: none.
    plain = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=8, temperature=0,
                                           logprobs=True)
    assert [c.top_logprobs for c in plain.choices[0].logprobs.content] == [[]] * len(tokens)
    none = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=8, temperature=0)
    assert none.choices[0].logprobs is None


def test_completion_logprobs_are_the_models_log_softmax(server, loaded, direct):
    prompt = "Once upon a time"
    expected = direct(6, prompt=prompt)
    tokens, chosen, top = _reference_logprobs(loaded, _prompt_ids(loaded, prompt=prompt), expected.token_ids, 2)
    body = {"prompt": prompt, "max_tokens": 6, "temperature": 0, "logprobs": 2}
    logprobs = _post(server, "/v1/completions", body).json()["choices"][0]["logprobs"]
    assert logprobs["tokens"] == tokens
    assert logprobs["token_logprobs"] == pytest.approx(chosen, abs=1e-4)
    for got, row, token, lp in zip(logprobs["top_logprobs"], top, tokens, chosen):
        assert got == pytest.approx({**dict(row), token: lp}, abs=1e-4)  # the chosen token is always there
    assert logprobs["text_offset"] == [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    events = _post(server, "/v1/completions", {**body, "stream": True}).text.split("\n\n")
    chunks = [json.loads(e[len("data: "):]) for e in events if e.startswith("data: {")]
    streamed = [c["choices"][0]["logprobs"] for c in chunks if c["choices"] and c["choices"][0]["logprobs"]]
    assert sum((s["tokens"] for s in streamed), []) == logprobs["tokens"]
    assert sum((s["token_logprobs"] for s in streamed), []) == pytest.approx(logprobs["token_logprobs"], abs=1e-5)
    assert sum((s["text_offset"] for s in streamed), []) == logprobs["text_offset"]


def test_the_client_example_in_the_docs_works(server):
    doc = (Path(__file__).parents[2] / "docs" / "inference.md").read_text()
    example = next(b for b in re.findall(r"```python\n(.*?)```", doc, re.DOTALL) if "from openai import" in b)
    assert f"--served-model-name {MODEL_NAME}" in doc and f'model="{MODEL_NAME}"' in example
    assert "http://127.0.0.1:8000/v1" in example
    code = example.replace("http://127.0.0.1:8000/v1", f"{server}/v1")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, MESHTRON_API_KEY=API_KEY))
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) >= 2


def test_twenty_concurrent_requests_match_direct_generation(server, direct):
    requests = [([{"role": "user", "content": f"Question number {i}: " + "why? " * (i % 5)}], 4 + i % 7)
                for i in range(20)]
    expected = [direct(max_tokens, messages=messages).text for messages, max_tokens in requests]
    client = _client(server)

    def ask(i):
        messages, max_tokens = requests[i]
        if i % 4 == 0:  # some stream, while others do not
            stream = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=max_tokens,
                                                    temperature=0, stream=True)
            return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        reply = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=max_tokens,
                                               temperature=0)
        return reply.choices[0].message.content

    with ThreadPoolExecutor(max_workers=20) as pool:
        got = list(pool.map(ask, range(20)))
    assert got == expected


def test_metrics_report_requests_tokens_and_time_to_first_token(server):
    reply = _client(server).completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=3, temperature=0)
    metrics = dict(line.split() for line in httpx.get(f"{server}/metrics").text.splitlines())
    assert metrics["meshtron_requests_running"] == "0" and metrics["meshtron_requests_waiting"] == "0"
    assert int(metrics["meshtron_generated_tokens_total"]) >= reply.usage.completion_tokens > 0
    assert float(metrics["meshtron_generation_tokens_per_second"]) > 0
    assert float(metrics["meshtron_time_to_first_token_seconds_last"]) > 0


@pytest.mark.parametrize(
    "body, fragment",
    [
        (b'{"messages": [{"role": "user", "content": "hi"}', "not valid JSON"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"}, "max_tokens"),
        ({"messages": "hello"}, "messages"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "word " * 400}]}, "context"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1000}, "limit"),
        ({"messages": [{"role": "user", "content": "hi"}], "model": "other"}, "not served"),
        ({"messages": [{"role": "user", "content": "hi"}], "presence_penalty": 0.5},
         "'presence_penalty' is not supported"),
        ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]},
         "'tools' is not supported"),
        ({"messages": [{"role": "user", "content": "hi", "name": "bob"}]}, "'messages[0].name' is not supported"),
        ({"messages": [{"role": "user", "content": "hi"}], "stream_options": {"x": 1}}, "'stream_options.x'"),
        ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "needs logprobs"),
        ({"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ],
)
def test_bad_requests_get_4xx_with_a_message_and_the_server_keeps_serving(server, body, fragment):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(f"{server}/v1/chat/completions", content=content, timeout=30,
                          headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"})
    assert 400 <= response.status_code < 500
    assert fragment in response.json()["error"]["message"]
    ok = _post(server, "/v1/chat/completions",
               {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0})
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["role"] == "assistant"


def test_fields_that_change_nothing_are_accepted(server):
    """Clients send some OpenAI fields at their neutral values (and null for absent); those are fine."""
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "presence_penalty": 0,
            "frequency_penalty": 0, "logit_bias": {}, "user": None, "tools": None, "logprobs": None}
    assert _post(server, "/v1/chat/completions", body).status_code == 200
    response = _post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 2, "echo": True})
    assert response.status_code == 400 and "'echo'" in response.json()["error"]["message"]
