"""Load a `JobConfig` from a TOML file plus `--section.key VALUE` overrides, check every key and
type, and write the resolved configuration back as TOML.

Errors are `UserError`s that name the file, the key and the fix: an unknown section or key
comes with a "did you mean", a wrongly typed value says which type was expected.
"""

import dataclasses
import difflib
import json
import keyword
import math
import tomllib
import types
import typing
from pathlib import Path

from meshtron.config.job import JobConfig
from meshtron.errors import UserError
from meshtron.models.common.masks import ATTENTION_BACKENDS
from meshtron.parallel.cp import CP_ALGOS

RECIPES = ("pretrain", "sft", "dpo", "simpo", "rm", "prm", "grpo", "ppo")
DTYPES = ("float32", "bfloat16", "float16")
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("constant", "cosine", "linear", "wsd")
RECOMPUTE_MODES = ("none", "selective", "op", "full")
PP_SCHEDULES = ("", "gpipe", "1f1b", "interleaved_1f1b", "zbv")


def _field_name(key: str) -> str:
    """TOML key -> dataclass field (`async` is a Python keyword, so its field is `async_`)."""
    return f"{key}_" if keyword.iskeyword(key) else key


def _toml_key(name: str) -> str:
    return name[:-1] if name.endswith("_") and keyword.iskeyword(name[:-1]) else name


def _sections() -> dict[str, type]:
    return typing.get_type_hints(JobConfig)


def _suggest(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(sorted(choices))}"


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}s"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false", dict: "a table"}.get(
        tp, str(tp)
    )


def _coerce(value, tp, where: str):
    """Check `value` (as TOML parsed it) against the field type `tp`; ints are accepted as floats."""
    origin = typing.get_origin(tp)
    if origin is types.UnionType and type(None) in typing.get_args(tp):
        # `float | None`: None (unset) is only a default, TOML has no null; a given value is the other type.
        (tp,) = [arg for arg in typing.get_args(tp) if arg is not type(None)]
        return _coerce(value, tp, where)
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"{where}: expected {_type_name(tp)}, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, bool) or not isinstance(value, tp):
        raise UserError(f"{where}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    _check_finite(value, where)
    return value


def _check_finite(value, where: str) -> None:
    """TOML has inf and nan; no setting means them (an lr of inf trains on NaN from the second step)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{where}: expected a finite number, got {value}")
    if isinstance(value, dict):  # model.args
        for key, item in value.items():
            _check_finite(item, f"{where}.{key}")
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check_finite(item, f"{where}[{i}]")


def _parse_override_value(text: str, tp):
    """An override's text as the field's type: TOML literal syntax, bare strings, comma lists."""
    if tp is str:
        return text
    if typing.get_origin(tp) is list and not text.lstrip().startswith("["):
        return [_parse_override_value(part.strip(), typing.get_args(tp)[0]) for part in text.split(",") if part.strip()]
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # reported as a type error by _coerce


def parse_overrides(overrides: list[str]) -> list[tuple[str, str]]:
    """["--train.steps", "5", "--lr.schedule=wsd"] -> [("train.steps", "5"), ("lr.schedule", "wsd")]."""
    pairs, i = [], 0
    while i < len(overrides):
        arg = overrides[i]
        if not arg.startswith("--") or "." not in arg:
            raise UserError(f"unexpected argument {arg!r}; overrides look like --section.key VALUE (e.g. --train.steps 5)")
        key = arg[2:]
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(overrides):
                raise UserError(f"override {arg} has no value; write {arg} VALUE")
            value = overrides[i + 1]
            i += 2
        pairs.append((key, value))
    return pairs


def _set(cfg: JobConfig, section: str, key: str, value, source: str, from_text: bool) -> None:
    sections = _sections()
    if section not in sections:
        raise UserError(f"{source}: unknown section [{section}]{_suggest(section, sections)}")
    section_obj = getattr(cfg, section)
    hints = typing.get_type_hints(type(section_obj))
    name = _field_name(key)
    if name not in hints:
        known = [_toml_key(n) for n in hints]
        raise UserError(f"{source}: unknown key {section}.{key}{_suggest(key, known)}")
    tp = hints[name]
    if from_text:
        value = _parse_override_value(value, tp)
    where = source if from_text else f"{source}: {section}.{key}"
    setattr(section_obj, name, _coerce(value, tp, where))


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> JobConfig:
    """Read a TOML file (None: defaults only), apply overrides, validate."""
    cfg = JobConfig()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file {path} does not exist")
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise UserError(f"{path}: invalid TOML: {e}") from None
        for section, table in raw.items():
            if not isinstance(table, dict):
                raise UserError(f"{path}: {section} = ... must be inside a section, e.g. [train]")
            for key, value in table.items():
                _set(cfg, section, key, value, str(path), from_text=False)
    for dotted, text in parse_overrides(overrides or []):
        section, _, key = dotted.partition(".")
        _set(cfg, section, key, text, f"--{dotted}", from_text=True)
    validate(cfg)
    return cfg


def _check_choice(value: str, choices, key: str) -> None:
    if value not in choices:
        raise UserError(f"{key} = {value!r} is not one of {', '.join(choices)}{_suggest(value, choices)}")


def _check_positive(value, key: str, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero) or (isinstance(value, float) and math.isnan(value)):
        raise UserError(f"{key} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _validate_handlers(cfg: JobConfig) -> None:
    from meshtron.data.handlers import HANDLER_NAMES

    named = {"data.handler": cfg.data.handler} if cfg.data.handler else {}
    named.update({f"data.handlers[{path!r}]": handler for path, handler in cfg.data.handlers.items()})
    for key, handler in named.items():
        _check_choice(handler, HANDLER_NAMES, key)
    unused = set(cfg.data.handlers) - set(cfg.data.paths) - set(cfg.data.eval_paths)
    if unused:
        raise UserError(f"data.handlers names {sorted(unused)[0]!r}, which is in neither data.paths nor "
                        "data.eval_paths; key each handler by a path exactly as written there")


def validate(cfg: JobConfig) -> None:
    """Checks that need no world size or files (ParallelDims and the trainer check the rest)."""
    _check_choice(cfg.train.recipe, RECIPES, "train.recipe")
    _check_choice(cfg.model.dtype, ("auto", *DTYPES), "model.dtype")
    _check_choice(cfg.model.master_dtype, DTYPES, "model.master_dtype")
    _check_choice(cfg.model.attention, ATTENTION_BACKENDS, "model.attention")
    _check_choice(cfg.optim.name, OPTIMIZERS, "optim.name")
    _check_choice(cfg.lr.schedule, SCHEDULES, "lr.schedule")
    _check_choice(cfg.recompute.mode, RECOMPUTE_MODES, "recompute.mode")
    if isinstance(cfg.train.compile, str) and cfg.train.compile != "auto":
        raise UserError(f"train.compile = {cfg.train.compile!r}: use true, false or \"auto\"")
    for key in ("train.steps", "train.global_batch_size", "train.micro_batch_size", "train.seq_length",
                "log.interval", "optim.lr"):
        section, name = key.split(".")
        _check_positive(getattr(getattr(cfg, section), name), key)
    for key in ("lr.warmup_steps", "lr.min_lr", "optim.weight_decay", "optim.grad_clip", "checkpoint.interval",
                "checkpoint.keep", "recompute.num_layers", "train.eval_interval", "data.num_workers", "train.sample_max_new_tokens",
                "train.sample_temperature", "train.sample_top_k"):
        section, name = key.split(".")
        _check_positive(getattr(getattr(cfg, section), name), key, allow_zero=True)
    _validate_optimizer(cfg)
    _check_positive(cfg.model.mtp_loss_weight, "model.mtp_loss_weight", allow_zero=True)
    _check_positive(cfg.train.max_skipped_steps, "train.max_skipped_steps")
    if cfg.train.loss_spike_factor and not cfg.train.loss_spike_factor > 1:
        raise UserError(f"train.loss_spike_factor must be > 1 (or 0 to disable), got {cfg.train.loss_spike_factor}")
    if not 0 <= cfg.lr.decay_ratio <= 1:
        raise UserError(f"lr.decay_ratio must be within [0, 1], got {cfg.lr.decay_ratio}")
    if cfg.data.weights and len(cfg.data.weights) != len(cfg.data.paths):
        raise UserError(
            f"data.weights has {len(cfg.data.weights)} values for {len(cfg.data.paths)} data.paths; give one weight "
            "per path or none"
        )
    if not cfg.data.paths and not cfg.data.mock:
        raise UserError("no training data: set data.paths (preprocessed prefixes or raw files) or data.mock = true")
    if cfg.data.eval_paths and cfg.data.mock:
        raise UserError("data.eval_paths needs real data; mock data has no held-out split (set data.mock = false)")
    _validate_handlers(cfg)
    from meshtron.models.common.args import CONTEXT_FIELDS
    from meshtron.models.common.moe import ROUTING_FIELDS

    shape_args = sorted(set(cfg.model.args) - ROUTING_FIELDS - CONTEXT_FIELDS)
    if shape_args and ":" not in cfg.model.name_or_path:
        raise UserError(
            f"model.args {', '.join(shape_args)} changes a flavor's shape, but model.name_or_path = "
            f"{cfg.model.name_or_path!r} is not a flavor (family:name); remove it (a pretrained model takes only "
            f"{', '.join(sorted(CONTEXT_FIELDS | ROUTING_FIELDS))})"
        )
    if cfg.lora.rank:
        from meshtron.lora.layers import validate_lora

        validate_lora(cfg.lora)
        if cfg.lora.quantize_base and cfg.parallel.tp != 1:
            raise UserError("QLoRA (lora.quantize_base = 'nf4') does not run with tensor parallel yet; set "
                            "parallel.tp = 1 (FSDP/HSDP work) or use a float base")
    _validate_float8(cfg)
    _check_choice(cfg.parallel.pp_schedule, PP_SCHEDULES, "parallel.pp_schedule")
    _check_choice(cfg.parallel.cp_algo, CP_ALGOS, "parallel.cp_algo")
    if cfg.parallel.pp > 1 and cfg.train.recipe not in ("pretrain", "sft"):
        raise UserError(f"the {cfg.train.recipe} recipe does not run with pipeline parallel yet (pretrain and sft "
                        "do); set parallel.pp = 1 and use dp_shard/tp")
    if cfg.parallel.pp > 1 and cfg.lora.rank and cfg.lora.quantize_base:
        raise UserError("QLoRA (lora.quantize_base) does not run with pipeline parallel yet; set parallel.pp = 1")
    if cfg.parallel.cp > 1 and cfg.train.recipe in ("grpo", "ppo"):
        raise UserError(f"the {cfg.train.recipe} recipe does not run with context parallel yet (pretrain, sft, dpo, "
                        "simpo, rm and prm do); set parallel.cp = 1")
    _check_choice(cfg.align.loss_type, ("sigmoid", "hinge", "ipo"), "align.loss_type")
    _check_choice(cfg.align.reference, ("auto", "copy", "lora", "precomputed"), "align.reference")
    _check_positive(cfg.align.beta, "align.beta")
    if not 0 <= cfg.align.label_smoothing < 0.5:
        raise UserError(f"align.label_smoothing must be in [0, 0.5), got {cfg.align.label_smoothing}")
    _validate_rl(cfg)
    _validate_moe(cfg)
    if cfg.checkpoint.resume not in ("auto", "none") and not Path(cfg.checkpoint.resume).exists():
        raise UserError(f"checkpoint.resume = {cfg.checkpoint.resume!r}: no such checkpoint; use auto, none or a path")


def _validate_float8(cfg) -> None:
    if not cfg.train.float8:
        return
    _check_choice(cfg.train.float8, ("tensorwise", "rowwise"), "train.float8")
    if cfg.lora.rank:
        raise UserError("train.float8 converts the full model's linears; it does not combine with LoRA (set "
                        "lora.rank = 0 or train.float8 = '')")
    if cfg.parallel.tp != 1:
        raise UserError("train.float8 does not run with tensor parallel yet; set parallel.tp = 1 (FSDP/HSDP work)")


def _validate_moe(cfg: JobConfig) -> None:
    """[moe]'s set keys: in range, and not given a second, different value in model.args."""
    moe = {key: value for key, value in dataclasses.asdict(cfg.moe).items() if value is not None}
    for key, value in moe.items():
        _check_positive(value, f"moe.{key}", allow_zero=key != "capacity_factor")
    clashes = [f"{key} ({cfg.model.args[key]} in model.args, {value} in [moe])" for key, value in moe.items()
               if key in cfg.model.args and cfg.model.args[key] != value]
    if clashes:
        raise UserError(f"{', '.join(clashes)}: set each in one place, [moe] (model.args is the older way)")


def _validate_rl(cfg: JobConfig) -> None:
    from meshtron.align.rl import KL_ESTIMATORS, LOSS_TYPES

    rl = cfg.rl
    _check_choice(rl.loss_type, LOSS_TYPES, "rl.loss_type")
    _check_choice(rl.kl_estimator, KL_ESTIMATORS, "rl.kl_estimator")
    for key in ("prompts_per_step", "group_size", "max_new_tokens", "updates_per_rollout", "temperature",
                "code_timeout_s"):
        _check_positive(getattr(rl, key), f"rl.{key}")
    for key in ("clip_low", "clip_high", "kl_coef"):
        _check_positive(getattr(rl, key), f"rl.{key}", allow_zero=True)
    if not 0 < rl.top_p <= 1:
        raise UserError(f"rl.top_p must be in (0, 1], got {rl.top_p}")
    if rl.clip_low >= 1:
        raise UserError(f"rl.clip_low must be below 1 (the ratio is clipped below at 1 - clip_low), got {rl.clip_low}")
    if not rl.rewards:
        raise UserError("rl.rewards is empty; give at least one reward function, e.g. rewards = {math = 1.0}")
    bad = [name for name, weight in rl.rewards.items() if isinstance(weight, bool) or not isinstance(weight, (int, float))]
    if bad:
        raise UserError(f"rl.rewards[{bad[0]!r}] must be a number (the reward's weight)")
    if cfg.train.recipe in ("grpo", "ppo") and cfg.data.mock:
        raise UserError(f"the {cfg.train.recipe} recipe generates from prompts: set data.paths to prompt files "
                        "(JSON lines with 'prompt' or 'messages'), not data.mock")
    if cfg.train.recipe == "grpo" and rl.group_size < 2:
        raise UserError("rl.group_size must be >= 2: a completion's advantage is its reward against its group's")
    if cfg.train.recipe == "ppo" and (rl.gamma < 0 or rl.gamma > 1 or rl.lam < 0 or rl.lam > 1):
        raise UserError(f"rl.gamma and rl.lam must be in [0, 1], got {rl.gamma} and {rl.lam}")
    if cfg.train.recipe == "ppo" and rl.value_clip <= 0:
        raise UserError(f"rl.value_clip must be > 0, got {rl.value_clip}")
    if cfg.train.recipe in ("grpo", "ppo") and cfg.train.global_batch_size != rl.prompts_per_step * rl.group_size:
        raise UserError(f"train.global_batch_size ({cfg.train.global_batch_size}) must be rl.prompts_per_step x "
                        f"rl.group_size ({rl.prompts_per_step} x {rl.group_size} = {rl.prompts_per_step * rl.group_size}"
                        "), the completions trained on per step")


def _validate_optimizer(cfg: JobConfig) -> None:
    """The ranges torch's optimizers accept (and a few they accept but cannot train with), checked here
    so that a bad value is one line at load instead of a traceback when the optimizer is built."""
    o = cfg.optim
    if len(o.betas) != 2 or not all(0 <= beta < 1 for beta in o.betas):
        raise UserError(f"optim.betas must be two values in [0, 1) (beta1, beta2), e.g. 0.9,0.95; got {o.betas}")
    if not o.eps > 0:  # eps = 0 divides by zero for a parameter whose gradient is zero
        raise UserError(f"optim.eps must be > 0 (AdamW's epsilon, e.g. 1e-8), got {o.eps}")
    if not 0 <= o.momentum < 1:
        raise UserError(f"optim.momentum must be in [0, 1), got {o.momentum}")
    if cfg.lr.min_lr > o.lr:
        raise UserError(f"lr.min_lr ({cfg.lr.min_lr}) is above the peak optim.lr ({o.lr}); the decay ends at "
                        "min_lr, so set it at or below optim.lr")


def to_dict(cfg: JobConfig) -> dict:
    return {
        section.name: {_toml_key(k): v for k, v in dataclasses.asdict(getattr(cfg, section.name)).items()}
        for section in dataclasses.fields(cfg)
    }


def to_toml(cfg: JobConfig) -> str:
    """The resolved configuration as TOML (what OUTPUT_DIR/config.toml holds; loads back unchanged)."""
    lines = []
    for section, table in to_dict(cfg).items():
        lines.append(f"[{section}]")
        # An unset (None) key is left out: TOML has no null, and a missing key loads back as unset.
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in table.items() if value is not None)
        lines.append("")
    return "\n".join(lines)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} as TOML")
