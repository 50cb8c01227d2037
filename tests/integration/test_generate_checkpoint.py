"""`meshtron generate` reads a meshtron checkpoint (here one written by `meshtron convert --to native`)
and gives the same text as from the Hugging Face directory it came from."""

import subprocess
import sys


def test_generate_from_a_checkpoint_equals_the_hf_directory(tiny_llama_dir, tiny_native_dir):
    def generate(model):
        cmd = [sys.executable, "-m", "meshtron", "generate", "--model", str(model), "--chat", "--prompt", "Hello",
               "--max-new-tokens", "10", "--dtype", "float32"]
        return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300).stdout

    from_hf = generate(tiny_llama_dir)
    assert from_hf.strip()
    assert generate(tiny_native_dir) == from_hf
