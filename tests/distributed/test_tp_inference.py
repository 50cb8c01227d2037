"""Tensor-parallel inference: `torchrun --nproc-per-node 2 -m meshtron generate` (gloo, CPU) prints
the same tokens as one process, for greedy decoding of a batch and for seeded sampling."""

import os
import signal
import subprocess
import sys

import pytest

ARGS = ["--prompt", "Hello world", "--prompt", "Hi", "--chat", "--max-new-tokens", "12", "--dtype", "float32"]


def _run(cmd):
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
    return out


@pytest.mark.parametrize("sampling", [[], ["--temperature", "0.9", "--top-k", "50", "--seed", "3"]],
                         ids=["greedy", "seeded-sampling"])
def test_tp2_generates_the_same_tokens_as_one_process(tiny_llama_dir, sampling):
    generate = ["-m", "meshtron", "generate", "--model", str(tiny_llama_dir), *ARGS, *sampling]
    single = _run([sys.executable, *generate])
    tp2 = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                *generate])
    assert len(single.splitlines()) == 2 and single.strip()
    assert tp2 == single


def test_tp2_from_a_meshtron_checkpoint(tiny_llama_dir, tiny_native_dir):
    """A checkpoint is loaded whole on each rank, then sharded."""
    def generate(model):
        return ["-m", "meshtron", "generate", "--model", str(model), *ARGS]

    expected = _run([sys.executable, *generate(tiny_llama_dir)])
    tp2 = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                *generate(tiny_native_dir)])
    assert tp2 == expected
