"""float8 training (train.float8, torchao's float8 linears; emulated on CPU): the blocks' linears are
converted, the losses stay close to the unconverted run's, the checkpoint holds the same tensors,
and the switch fails with one line when torchao is missing or the layout is not supported."""

import sys

import pytest

from meshtron.errors import UserError

STEPS = ["--train.steps", "5", "--checkpoint.save_final", "true"]


def _checkpoint_keys(run_dir):
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(str(run_dir / "checkpoints" / "step-5")).read_metadata().state_dict_metadata
    return {k: (v.size, v.properties.dtype) for k, v in meta.items() if k.startswith("model.")}


@pytest.fixture(scope="module")
def baseline(run_train, tiny_config, tmp_path_factory):
    out = tmp_path_factory.mktemp("float8-off")
    _, records = run_train(tiny_config, out, overrides=STEPS)
    return out, records


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_float8_training_stays_close_to_the_unconverted_run(run_train, tiny_config, baseline, tmp_path, recipe):
    result, records = run_train(tiny_config, tmp_path, overrides=[*STEPS, "--train.float8", recipe])
    # llama:debug: 2 blocks x 7 linears converted, the head kept; emulated on CPU.
    assert f"float8 ({recipe} scaling, emulated): 14 linear layers converted" in result.stderr
    losses, reference = [r["loss"] for r in records], [r["loss"] for r in baseline[1]]
    assert losses != reference  # float8 rounding is really applied
    # The gap docs/training.md states: within 1% at every step of this short run.
    assert losses == pytest.approx(reference, rel=1e-2)
    assert _checkpoint_keys(tmp_path) == _checkpoint_keys(baseline[0])


def test_float8_without_torchao_fails_with_one_line(monkeypatch):
    from meshtron.train.converters import Float8Converter

    monkeypatch.setitem(sys.modules, "torchao.float8", None)  # what an environment without torchao raises
    with pytest.raises(UserError, match=r"train.float8 needs torchao: pip install torchao"):
        Float8Converter("rowwise", "cpu")


@pytest.mark.parametrize("overrides, message", [
    (["--train.float8", "e5m2"], "train.float8 = 'e5m2' is not one of tensorwise, rowwise"),
    (["--train.float8", "rowwise", "--lora.rank", "4"], "does not combine with LoRA"),
])
def test_float8_settings_are_checked(run_train, tiny_config, tmp_path, overrides, message):
    result, _ = run_train(tiny_config, tmp_path, overrides=overrides, check=False)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
