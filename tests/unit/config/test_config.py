"""The training config: typed sections, overrides, one clear message per mistake, TOML round trip."""

import pytest

from meshtron.config import JobConfig, load_config, to_toml
from meshtron.errors import UserError

MOCK = ["--data.mock", "true"]


def write(tmp_path, text):
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def test_file_values_and_overrides_are_typed(tmp_path):
    path = write(tmp_path, '[data]\nmock = true\n[train]\nsteps = 7\n[optim]\nlr = 1\n')
    cfg = load_config(path, ["--train.seed", "3", "--optim.betas", "0.8,0.9", "--model.args={num_layers = 3}",
                             "--lr.schedule", "wsd"])
    assert (cfg.train.steps, cfg.train.seed, cfg.lr.schedule) == (7, 3, "wsd")
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)  # an integer is a valid float
    assert cfg.optim.betas == [0.8, 0.9]
    assert cfg.model.args == {"num_layers": 3}


def test_async_key_maps_to_a_python_field(tmp_path):
    cfg = load_config(write(tmp_path, "[data]\nmock = true\n[checkpoint]\nasync = true\n"))
    assert cfg.checkpoint.async_ is True


@pytest.mark.parametrize(
    "text, overrides, message",
    [
        ("[trian]\nsteps = 3\n", [], "unknown section [trian]; did you mean 'train'?"),
        ("[train]\nstpes = 3\n", [], "unknown key train.stpes; did you mean 'steps'?"),
        ("", ["--optim.learning_rate", "1"], "unknown key optim.learning_rate"),
        ('[train]\nsteps = "ten"\n', [], "train.steps: expected an integer, got 'ten'"),
        ("", ["--train.steps", "1.5"], "--train.steps: expected an integer, got 1.5"),
        ("", ["--data.mock", "yes"], "--data.mock: expected true or false, got 'yes'"),
        ("[train]\nrecipe = \"pretrian\"\n", [], "train.recipe = 'pretrian' is not one of pretrain, sft"),
        ("[train]\nrecipe = \"pretrian\"\n", [], "did you mean 'pretrain'?"),
        ("[data]\npaths = [\"a\", \"b\"]\nweights = [1.0]\n", [], "data.weights has 1 values for 2 data.paths"),
        ("[train]\nsteps = 0\n", [], "train.steps must be > 0"),
        ("", ["--train.steps"], "override --train.steps has no value"),
        ("", ["steps=3"], "overrides look like --section.key VALUE"),
        ("[train\n", [], "invalid TOML"),
        ("", ["--optim.lr", "inf"], "--optim.lr: expected a finite number, got inf"),
        ("[optim]\nlr = nan\n", [], "optim.lr: expected a finite number, got nan"),
        ("[lr]\nmin_lr = -inf\n", [], "lr.min_lr: expected a finite number, got -inf"),
        ("", ["--optim.betas", "0.9,inf"], "--optim.betas[1]: expected a finite number, got inf"),
        ("", ["--model.args", "{rope_theta = inf}"], "--model.args.rope_theta: expected a finite number"),
        ("", ["--model.name_or_path", "some/hf_dir", "--model.args", "{num_layers = 2, aux_loss_coef = 0.01}"],
         "model.args num_layers changes a flavor's shape, but model.name_or_path = 'some/hf_dir' is not a flavor"),
        ("", ["--optim.betas", "0.9,1.5"], "optim.betas must be two values in [0, 1)"),
        ("", ["--optim.betas", "-0.1,0.9"], "optim.betas must be two values in [0, 1)"),
        ("", ["--optim.betas", "0.9"], "optim.betas must be two values in [0, 1)"),
        ("", ["--optim.eps", "0"], "optim.eps must be > 0"),
        ("", ["--optim.weight_decay", "-0.1"], "optim.weight_decay must be >= 0"),
        ("", ["--optim.grad_clip", "-1"], "optim.grad_clip must be >= 0"),
        ("", ["--optim.momentum", "1"], "optim.momentum must be in [0, 1)"),
        ("", ["--optim.lr", "1e-3", "--lr.min_lr", "1e-2"], "lr.min_lr (0.01) is above the peak optim.lr"),
        ("", ["--train.max_skipped_steps", "0"], "train.max_skipped_steps must be > 0"),
        ("", ["--train.sample_temperature", "-1"], "train.sample_temperature must be >= 0"),
        ("", ["--train.loss_spike_factor", "0.5"], "train.loss_spike_factor must be > 1 (or 0 to disable)"),
        ("", ["--parallel.cp_algo", "rings"], "parallel.cp_algo = 'rings' is not one of ring, ulysses, hybrid"),
        ("", ["--parallel.cp", "2", "--train.recipe", "grpo"], "the grpo recipe does not run with context parallel yet"),
        ("", ["--moe.z_loss_coef", "-0.1"], "moe.z_loss_coef must be >= 0"),
        ("", ["--moe.capacity_factor", "0"], "moe.capacity_factor must be > 0"),
        ("[moe]\naux_loss_coef = \"high\"\n", [], "moe.aux_loss_coef: expected a number, got 'high'"),
        ("", ["--model.args", "{aux_loss_coef = 0.01}", "--moe.aux_loss_coef", "0.02"],
         "aux_loss_coef (0.01 in model.args, 0.02 in [moe]): set each in one place, [moe]"),
    ],
)
def test_mistakes_give_one_clear_message(tmp_path, text, overrides, message):
    with pytest.raises(UserError) as e:
        load_config(write(tmp_path, text + ("\n[data]\nmock = true\n" if "[data]" not in text else "")), overrides)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_no_data_is_reported(tmp_path):
    with pytest.raises(UserError, match="no training data: set data.paths"):
        load_config(write(tmp_path, ""))


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


def test_moe_section_is_typed_and_unset_by_default(tmp_path):
    assert load_config(None, MOCK).moe.aux_loss_coef is None  # unset: the model's own value
    cfg = load_config(write(tmp_path, "[data]\nmock = true\n[moe]\ncapacity_factor = 2\n"), ["--moe.aux_loss_coef", "0"])
    assert (cfg.moe.capacity_factor, cfg.moe.aux_loss_coef) == (2.0, 0.0)
    assert isinstance(cfg.moe.capacity_factor, float) and cfg.moe.z_loss_coef is None
    # The same value in model.args and [moe] is no conflict.
    load_config(None, [*MOCK, "--model.args", "{aux_loss_coef = 0.01}", "--moe.aux_loss_coef", "0.01"])


def test_resolved_config_round_trips_through_toml(tmp_path):
    cfg = load_config(None, [*MOCK, "--model.args", "{dim = 32, num_layers = 1}", "--train.sample_prompt",
                             'say "hi"', "--optim.eps", "1e-6", "--moe.bias_update_rate", "0.01"])
    again = load_config(write(tmp_path, to_toml(cfg)))
    assert again == cfg
    assert again != JobConfig()
