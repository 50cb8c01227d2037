"""`--compile` on the CLI: SmolLM2's greedy output through the compiled static-shape decode equals the
cached decode's, for a batch of two prompts (left padding) with a stop string."""

import subprocess
import sys

import pytest


def _generate(model, *extra) -> str:
    cmd = [sys.executable, "-m", "meshtron", "generate", "--model", str(model), "--dtype", "float32",
           "--prompt", "The capital of France is", "--prompt", "Once upon a time, in a small village,",
           "--max-new-tokens", "24", "--stop", ".", *extra]
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=1200).stdout


@pytest.mark.slow  # compiles SmolLM2's decode step: a minute or more on a loaded CPU
def test_compiled_generate_prints_the_same_text(smollm2_dir):
    eager = _generate(smollm2_dir)
    assert eager.count("\n") == 2 and eager.strip()
    assert _generate(smollm2_dir, "--compile") == eager
