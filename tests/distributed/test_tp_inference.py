"""Tensor-parallel inference: `torchrun --nproc-per-node 2 -m meshtron generate` (gloo, CPU) prints
the same tokens as one process, for greedy decoding of a batch and for seeded sampling."""

import os
import subprocess
import sys

import pytest

ARGS = ["--prompt", "Hello world", "--prompt", "Hi", "--chat", "--max-new-tokens", "12", "--dtype", "float32"]


def _run(cmd):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.parametrize("sampling", [[], ["--temperature", "0.9", "--top-k", "50", "--seed", "3"]],
                         ids=["greedy", "seeded-sampling"])
def test_tp2_generates_the_same_tokens_as_one_process(tiny_llama_dir, sampling):
    generate = ["-m", "meshtron", "generate", "--model", str(tiny_llama_dir), *ARGS, *sampling]
    single = _run([sys.executable, *generate])
    tp2 = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                *generate])
    assert len(single.splitlines()) == 2 and single.strip()
    assert tp2 == single
