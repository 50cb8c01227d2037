"""Fixtures of the multi-process tests: a tiny training config, a `meshtron train` runner that
runs its ranks (gloo on CPU) as torchrun would and returns the run's metrics records, the config writer
of the alignment and RL recipes' tests (a tiny model with SmolLM2's tokenizer), their reward module and
one tiny rm run."""

import json
import os
from pathlib import Path

import pytest
from launch import run_meshtron

REPO = Path(__file__).resolve().parents[2]

# The llama:debug model on deterministic mock data, a few float32 steps; no plot, TensorBoard or
# final checkpoint unless a test asks for them.
TINY_CONFIG = """
[model]
name_or_path = "llama:debug"
[data]
mock = true
[train]
steps = 5
global_batch_size = 4
micro_batch_size = 2
seq_length = 32
[optim]
lr = 0.01
[lr]
warmup_steps = 1
[log]
tensorboard = false
plot = false
[checkpoint]
save_final = false
"""


# llama:debug with SmolLM2's vocabulary and tokenizer (the alignment and RL recipes read chat data),
# a few float32 steps at a constant learning rate; the caller adds the recipe's own settings.
RECIPE_CONFIG = """
[model]
name_or_path = "llama:debug"
args = {{vocab_size = 49152}}
tokenizer = "{tokenizer}"
[data]
paths = ["{data}"]
eval_paths = [{eval_paths}]
[train]
recipe = "{recipe}"
steps = 4
{train}
[optim]
lr = {lr}
[lr]
schedule = "constant"
[log]
tensorboard = false
plot = false
[checkpoint]
save_final = false
{sections}
"""

# A reward that a random model's completions already spread over (the share of letters in them),
# so that advantages, gradients and the KL are not zero from the first step. With COMPLETIONS_LOG set,
# each call also appends the completions it scores, one JSON list a line, to COMPLETIONS_LOG.<RANK>:
# what each rank sampled, for the tests that compare it over layouts.
REWARD_MODULE = """
import json
import os


def letters(prompts, completions, **fields):
    if os.environ.get("COMPLETIONS_LOG"):
        with open(f"{os.environ['COMPLETIONS_LOG']}.{os.environ.get('RANK', '0')}", "a") as log:
            log.write(json.dumps(completions) + "\\n")
    return [sum(ch.isalpha() for ch in c) / max(len(c), 1) for c in completions]
"""


@pytest.fixture(scope="session")
def recipe_config(smollm2_dir):
    """`recipe_config(path, recipe, data, train=..., eval_paths=(), lr=0.003, sections="")` writes a
    config of the tiny model with SmolLM2's tokenizer to `path`: `data`, `eval_paths` are files of
    data/ or paths, `train` the [train] keys besides recipe and steps, `sections` whole sections."""

    def write(path: Path, recipe: str, data, train: str = "global_batch_size = 4\nmicro_batch_size = 2\n"
              "seq_length = 64", eval_paths=(), lr: float = 0.003, sections: str = "") -> Path:
        held_out = ", ".join(f'"{REPO / "data" / p}"' for p in eval_paths)
        path.write_text(RECIPE_CONFIG.format(tokenizer=smollm2_dir, data=REPO / "data" / data, eval_paths=held_out,
                                             recipe=recipe, train=train, lr=lr, sections=sections))
        return path

    return write


@pytest.fixture(scope="session")
def reward_module_env(tmp_path_factory) -> dict:
    """The environment under which `tiny_rewards:letters` imports (REWARD_MODULE)."""
    root = tmp_path_factory.mktemp("rewards")
    (root / "tiny_rewards.py").write_text(REWARD_MODULE)
    return {"PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}


class CompletionsLog:
    """What each rank sampled: run under `env(reward_env, output_dir)`, the reward module's `letters`
    appends the completions it scores to output_dir/completions.<RANK>; `read` gives them back, one
    list per reward call (each rollout, each held-out batch)."""

    @staticmethod
    def env(reward_env: dict, output_dir: Path) -> dict:
        return {**reward_env, "COMPLETIONS_LOG": str(output_dir / "completions")}

    @staticmethod
    def read(output_dir: Path, rank: int) -> list[list[str]]:
        path = output_dir / f"completions.{rank}"
        return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="session")
def completions_log():
    return CompletionsLog


@pytest.fixture(scope="session")
def tiny_rm_run(recipe_config, run_train, tmp_path_factory):
    """(config, run directory, records) of a 4-step rm run on the preference pairs, held-out pairs
    evaluated, its final checkpoint saved."""
    root = tmp_path_factory.mktemp("rm")
    config = recipe_config(root / "rm.toml", "rm", "preferences.jsonl", eval_paths=["preferences_heldout.jsonl"],
                           sections="[align]\nrm_margin = 0.0\n")
    _, records = run_train(config, root / "run", overrides=["--checkpoint.save_final", "true"])
    return config, root / "run", records


@pytest.fixture(scope="session")
def tiny_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("config") / "tiny.toml"
    path.write_text(TINY_CONFIG)
    return path


def _run_train(config: Path, output_dir: Path, nproc: int = 1, overrides=(), check: bool = True, timeout: int = 300,
               env: dict | None = None, max_restarts: int = 0):
    """(completed process, metrics records). One thread per rank so ranks share the cores without oversubscription.
    `env`: extra environment (drill switches); `max_restarts`: torchrun's --max-restarts (then under torchrun
    itself; otherwise the ranks are forked with torchrun's environment, see tests/launch.py)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    argv = ["train", str(config), "--train.output_dir", str(output_dir), *overrides]
    result = run_meshtron(argv, nproc=nproc, env=env, timeout=timeout, max_restarts=max_restarts)
    if check and result.returncode != 0:
        raise AssertionError(f"meshtron {' '.join(argv)} on {nproc} rank(s) failed ({result.returncode}):\n"
                             f"{result.stderr[-4000:]}")
    return result, read_records(output_dir)


def read_records(output_dir: Path) -> list[dict]:
    metrics = Path(output_dir) / "metrics.jsonl"
    return [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []


@pytest.fixture(scope="session")
def run_train():
    """`run_train(config, output_dir, nproc=1, overrides=(), check=True)` -> (process, metrics records)."""
    return _run_train


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory):
    """A tiny random Llama saved as an HF directory (safetensors): a pretrained-model source."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    path = tmp_path_factory.mktemp("hf") / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(str(path))
    return path
