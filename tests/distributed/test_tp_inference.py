"""Tensor-parallel inference: `torchrun --nproc-per-node 2 -m meshtron generate` (gloo, CPU) prints
the same tokens as one process, for greedy decoding of a batch and for seeded sampling, and
`torchrun --nproc-per-node 2 -m meshtron serve` of a LoRA run answers requests as one process generates."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

ARGS = ["--prompt", "Hello world", "--prompt", "Hi", "--chat", "--max-new-tokens", "12", "--dtype", "float32"]


def _run(cmd, with_stderr=False):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # A session of its own, so that a hung run is killed with its worker processes.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"timed out: {' '.join(cmd)}\n{err[-3000:]}")
    assert proc.returncode == 0, err[-3000:]
    return (out, err) if with_stderr else out


# Slow: the default suite sees greedy tp=2 `generate` (from a checkpoint, below) and greedy and seeded
# sampling through tp=2 `serve`.
@pytest.mark.slow
@pytest.mark.parametrize("sampling", [[], ["--temperature", "0.9", "--top-k", "50", "--seed", "3"]],
                         ids=["greedy", "seeded-sampling"])
def test_tp2_generates_the_same_tokens_as_one_process(tiny_llama_dir, sampling):
    generate = ["-m", "meshtron", "generate", "--model", str(tiny_llama_dir), *ARGS, *sampling]
    single = _run([sys.executable, *generate])
    tp2 = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                *generate])
    assert len(single.splitlines()) == 2 and single.strip()
    assert tp2 == single


def test_tp2_from_a_meshtron_checkpoint_loads_half_the_weights_per_rank(tiny_llama_dir, tiny_native_dir):
    """The model is sharded before it is materialized and each rank loads only its shards: about half
    the weights of one process per rank (the norms are replicated), never the whole model."""
    from meshtron.checkpoint import load_for_inference, local_bytes

    def generate(model):
        return ["-m", "meshtron", "generate", "--model", str(model), *ARGS]

    expected = _run([sys.executable, *generate(tiny_llama_dir)])
    tp2, log = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                     *generate(tiny_native_dir)], with_stderr=True)
    assert tp2 == expected
    whole = local_bytes(load_for_inference(tiny_native_dir)[0])
    held = {int(rank): int(n) for rank, n in re.findall(r"rank (\d+) holds (\d+) bytes of weights", log)}
    assert sorted(held) == [0, 1], log[-3000:]
    assert all(0.5 * whole <= n <= 0.52 * whole for n in held.values()), (held, whole)


def test_a_process_count_the_heads_cannot_split_names_the_counts_that_work_once(tiny_llama_dir, tmp_path):
    """6 attention heads and 3 key/value heads (like SmolLM2's 9 and 3) split over 3 processes, not 2."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    model_dir = tmp_path / "three-kv-heads"
    config = LlamaConfig(vocab_size=49152, hidden_size=48, intermediate_size=96, num_hidden_layers=1,
                         num_attention_heads=6, num_key_value_heads=3, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(model_dir))
    for tokenizer_file in tiny_llama_dir.glob("tokenizer*"):
        shutil.copy(tokenizer_file, model_dir)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "meshtron", "generate", "--model", str(model_dir), "--prompt", "Hi"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                            timeout=180)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if "meshtron generate: error:" in line]
    assert len(errors) == 1, result.stderr[-3000:]
    assert "its key/value heads (3) do not divide by 2" in errors[0]
    assert "launch 3 processes" in errors[0]


@pytest.fixture(scope="module")
def lora_run(run_train, tiny_config, tiny_llama_dir, tmp_path_factory):
    """A LoRA run on `tiny_llama_dir` (adapters only in its checkpoint, the base read from the HF directory),
    trained hard enough that its greedy text differs from the base model's."""
    out = tmp_path_factory.mktemp("lora-run")
    run_train(tiny_config, out, overrides=["--model.name_or_path", str(tiny_llama_dir), "--lora.rank", "4",
                                           "--optim.lr", "0.05", "--checkpoint.save_final", "true"])
    return out


def test_tp2_serve_answers_like_one_process_and_stops_on_sigterm(tiny_llama_dir, lora_run):
    """`torchrun --nproc-per-node 2 -m meshtron serve` of a LoRA run (the base's shards and the adapters'
    sharded like their layers): concurrent requests (greedy ones joining a running batch, seeded sampling,
    a stream) give the text of generation in one process; SIGTERM to torchrun shuts rank 0's server
    down, which ends rank 1's loop, and no process is left."""
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    from concurrent.futures import ThreadPoolExecutor

    from meshtron.infer.generation import SamplingParams, generate_text
    from meshtron.infer.loading import load_for_generation

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "meshtron", "serve", "--model", str(lora_run), "--port", str(port),
                             "--dtype", "float32", "--max-model-len", "256"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        base = f"http://127.0.0.1:{port}"
        while not _answers(httpx, f"{base}/health"):
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            time.sleep(0.5)
        requests = [{"prompt": "Once upon a time", "max_tokens": 12, "temperature": 0},
                    {"prompt": "The capital of France is", "max_tokens": 5, "temperature": 0},
                    {"prompt": "Hi", "max_tokens": 9, "temperature": 0.9, "top_k": 50, "seed": 3},
                    {"prompt": "Hello", "max_tokens": 7, "temperature": 0, "stream": True}]

        def ask(body):
            response = httpx.post(f"{base}/v1/completions", json=body, timeout=120)
            assert response.status_code == 200, response.text
            if not body.get("stream"):
                return response.json()["choices"][0]["text"]
            events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
            return "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])

        with ThreadPoolExecutor(len(requests)) as pool:
            got = list(pool.map(ask, requests))
    finally:
        proc.send_signal(signal.SIGTERM)  # to torchrun alone, which passes it on to the ranks
        try:
            log, _ = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"torchrun did not stop on SIGTERM:\n{proc.communicate()[0][-3000:]}")

    def generate(model):
        loaded = load_for_generation(str(model), dtype="float32")
        return [generate_text(loaded.model, loaded.tokenizer, [loaded.tokenizer(r["prompt"])["input_ids"]],
                              SamplingParams(max_new_tokens=r["max_tokens"], temperature=r["temperature"],
                                             top_k=r.get("top_k", 0), seed=r.get("seed"),
                                             stop_token_ids=loaded.stop_token_ids))[0].text for r in requests]

    assert got == generate(lora_run)
    assert got != generate(tiny_llama_dir)  # the adapters count
    assert "Application shutdown complete" in log and "rank 1: rank 0 shut the server down" in log, log[-3000:]
    with pytest.raises(ProcessLookupError):  # no rank outlives torchrun
        os.killpg(proc.pid, 0)


def _answers(httpx, url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.TransportError:
        return False
