"""`meshtron serve` end to end on a tiny random model: the openai client, streaming, 20 concurrent
requests against direct greedy generation, and request validation (the server keeps serving)."""

import json
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

MODEL_NAME = "tiny"
MAX_MODEL_LEN = 256


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshtron", "serve", "--model", str(tiny_llama_dir), "--port", str(port),
         "--served-model-name", MODEL_NAME, "--max-model-len", str(MAX_MODEL_LEN), "--max-tokens", "64",
         "--dtype", "float32"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
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
    yield base
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def direct(tiny_llama_dir):
    """Greedy generation in this process, one prompt at a time: what the server must return."""
    from meshtron.infer.generation import SamplingParams, generate_text
    from meshtron.infer.loading import encode_messages, load_for_generation

    loaded = load_for_generation(str(tiny_llama_dir), dtype="float32")

    def run(max_tokens: int, messages=None, prompt=None):
        ids = encode_messages(loaded.tokenizer, messages) if messages else loaded.tokenizer(prompt)["input_ids"]
        params = SamplingParams(max_new_tokens=max_tokens, stop_token_ids=loaded.stop_token_ids)
        return generate_text(loaded.model, loaded.tokenizer, [ids], params)[0]

    return run


def _client(base):
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)


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


def test_models_and_health(server):
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}
    assert [m.id for m in _client(server).models.list().data] == [MODEL_NAME]


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
    ],
)
def test_bad_requests_get_4xx_with_a_message_and_the_server_keeps_serving(server, body, fragment):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(f"{server}/v1/chat/completions", content=content,
                          headers={"Content-Type": "application/json"}, timeout=30)
    assert 400 <= response.status_code < 500
    assert fragment in response.json()["error"]["message"]
    ok = httpx.post(f"{server}/v1/chat/completions", timeout=30,
                    json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0})
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["role"] == "assistant"
