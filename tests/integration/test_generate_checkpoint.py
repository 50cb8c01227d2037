"""`meshtron generate` reads a meshtron checkpoint (here one written by `meshtron convert --to native`)
and gives the same text as from the Hugging Face directory it came from."""

from launch import run_meshtron


def test_generate_from_a_checkpoint_equals_the_hf_directory(tiny_llama_dir, tiny_native_dir):
    def generate(model):
        result = run_meshtron(["generate", "--model", model, "--chat", "--prompt", "Hello", "--max-new-tokens", "10",
                               "--dtype", "float32"], timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout

    from_hf = generate(tiny_llama_dir)
    assert from_hf.strip()
    assert generate(tiny_native_dir) == from_hf
