"""Serving benchmark (not a test): `meshtron serve` completing 16 requests of mixed lengths sent
all at once (continuous batching) against the same 16 sent one after another.

Starts `meshtron serve` on the model, sends the requests over HTTP (/v1/completions, greedy;
a reply may end early at the model's stop token, the same way both times), and reports the
wall time of each way, the ratio, and the server's /metrics after the concurrent run. The two
ways alternate over --repeats (medians reported), so that load from other processes falls on
both alike. The concurrent replies must equal the sequential ones (checked).

    python bench/bench_serve.py                    # the example SmolLM2 on CPU
"""

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, port: int, max_batch_size: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "meshtron", "serve", "--model", model, "--port", str(port),
                             "--max-model-len", "512", "--max-batch-size", str(max_batch_size)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("the server did not start")


def requests(n: int) -> list[tuple[str, int]]:
    """Mixed prompt lengths (8 to about 120 words) and output lengths (8 to 64 tokens)."""
    return [(f"Request {i}: " + "tell me more about the weather and the sea. " * (1 + 3 * (i % 4)), 8 + 8 * (i % 8))
            for i in range(n)]


def ask(base: str, prompt: str, max_tokens: int) -> str:
    reply = httpx.post(f"{base}/v1/completions", timeout=600, json={
        "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
    reply.raise_for_status()
    body = reply.json()
    assert body["usage"]["completion_tokens"] <= max_tokens
    return body["choices"][0]["text"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="HF model directory (default: the example SmolLM2)")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    opts = parser.parse_args()
    if opts.model is None:
        from meshtron.assets import prepare_smollm2

        opts.model = str(prepare_smollm2())
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_server(opts.model, port, opts.max_batch_size)
    work = requests(opts.requests)
    times = {"sequential": [], "concurrent": []}
    try:
        ask(base, "warm up", 4)
        for _ in range(opts.repeats):
            start = time.perf_counter()
            sequential = [ask(base, p, n) for p, n in work]
            times["sequential"].append(time.perf_counter() - start)
            start = time.perf_counter()
            with ThreadPoolExecutor(max_workers=len(work)) as pool:
                concurrent = list(pool.map(lambda w: ask(base, *w), work))
            times["concurrent"].append(time.perf_counter() - start)
            assert concurrent == sequential, "concurrent replies differ from sequential ones"
        metrics = httpx.get(f"{base}/metrics").text
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    seq, conc = statistics.median(times["sequential"]), statistics.median(times["concurrent"])
    print(f"# {opts.requests} requests, max batch {opts.max_batch_size}, load average {os.getloadavg()[0]:.1f}, "
          f"runs {times}", file=sys.stderr)
    print("| way | wall s (median) | speedup |")
    print("| --- | ---: | ---: |")
    print(f"| one after another | {seq:.1f} | 1.00x |")
    print(f"| all at once (continuous batching) | {conc:.1f} | {seq / conc:.2f}x |")
    print(metrics, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
