"""LoRA and QLoRA under the parallel layouts: single process vs dp_shard=2, tp=2, pp=2 and cp=2 (adapters
sharded like their base layers), adapter-only checkpoints, and QLoRA under FSDP."""

import json

import pytest

RTOL = 2e-5
LORA = ["--lora.rank", "4", "--lora.alpha", "8", "--train.steps", "4"]


@pytest.fixture(scope="module")
def single(run_train, tiny_config, hf_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora-single")
    result, records = run_train(tiny_config, out, overrides=["--model.name_or_path", str(hf_dir), *LORA,
                                                             "--checkpoint.save_final", "true"])
    return out, result, records


def test_lora_trains_adapters_only(single):
    out, result, records = single
    assert "LoRA rank 4 on all-linear: 8,192 trainable parameters of" in result.stderr
    assert records[-1]["loss"] != records[0]["loss"]
    from torch.distributed.checkpoint import FileSystemReader

    step = out / "checkpoints" / "step-4"
    keys = FileSystemReader(str(step)).read_metadata().state_dict_metadata.keys()
    model_keys = [k for k in keys if k.startswith("model.")]
    optim_keys = [k for k in keys if k.startswith("optimizer.state.")]
    # 2 layers x 7 projections x (A, B); no base weight is saved, and the optimizer holds adapters only.
    assert len(model_keys) == 28 and all(".lora_A." in k or ".lora_B." in k for k in model_keys)
    assert optim_keys and all(".lora_A." in k or ".lora_B." in k for k in optim_keys)
    manifest = json.loads((step / "manifest.json").read_text())
    assert manifest["lora"]["rank"] == 4 and manifest["base_model"]["kind"] == "hf"


@pytest.mark.parametrize("nproc, layout", [(2, ["--parallel.dp_shard", "2"]),
                                           (2, ["--parallel.tp", "2", "--parallel.dp_shard", "1"]),
                                           (2, ["--parallel.pp", "2"]),
                                           (2, ["--parallel.cp", "2"])],
                         ids=["fsdp2", "tp2-sp", "pp2", "cp2"])
def test_lora_layouts_match_single_process(run_train, tiny_config, hf_dir, single, tmp_path, nproc, layout):
    _, sharded = run_train(tiny_config, tmp_path, nproc=nproc,
                           overrides=["--model.name_or_path", str(hf_dir), *LORA, *layout])
    assert [r["loss"] for r in sharded] == pytest.approx([r["loss"] for r in single[2]], rel=RTOL)


def test_qlora_runs_under_fsdp(run_train, tiny_config, hf_dir, tmp_path):
    qlora = ["--model.name_or_path", str(hf_dir), *LORA, "--lora.quantize_base", "nf4", "--model.dtype", "bfloat16"]
    _, one = run_train(tiny_config, tmp_path / "one", overrides=qlora)
    _, two = run_train(tiny_config, tmp_path / "two", nproc=2, overrides=[*qlora, "--parallel.dp_shard", "2"])
    # bfloat16 compute: the two layouts agree to bf16 rounding.
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=2e-3)


def test_lora_with_full_recompute_matches(run_train, tiny_config, hf_dir, single, tmp_path):
    _, records = run_train(tiny_config, tmp_path, overrides=["--model.name_or_path", str(hf_dir), *LORA,
                                                             "--recompute.mode", "full"])
    assert [r["loss"] for r in records] == pytest.approx([r["loss"] for r in single[2]], rel=RTOL)


@pytest.mark.parametrize("quantize", [[], ["--lora.quantize_base", "nf4", "--model.dtype", "bfloat16"]],
                         ids=["lora", "qlora"])
def test_an_interrupted_lora_run_resumes_to_the_uninterrupted_losses(run_train, tiny_config, hf_dir, tmp_path,
                                                                     quantize):
    """LoRA checkpoints hold only the adapters: a resume must load the base weights from the base model."""
    lora = ["--model.name_or_path", str(hf_dir), *LORA, "--checkpoint.interval", "2", *quantize]
    _, straight = run_train(tiny_config, tmp_path / "straight", overrides=lora)
    _, resumed = run_train(tiny_config, tmp_path / "resumed", overrides=[
        *lora, "--checkpoint.resume", str(tmp_path / "straight" / "checkpoints" / "step-2")])
    assert [r["step"] for r in resumed] == [3, 4]
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in straight[2:]], rel=RTOL)


def test_a_resume_onto_another_base_model_is_refused(run_train, tiny_config, hf_dir, single, tmp_path):
    import shutil

    out, _, _ = single
    other = tmp_path / "other-base"
    shutil.copytree(hf_dir, other)
    result, _ = run_train(tiny_config, tmp_path / "run", check=False, overrides=[
        "--model.name_or_path", str(other), *LORA, "--checkpoint.resume", str(out / "checkpoints" / "step-4")])
    assert result.returncode == 2
    assert f"holds LoRA adapters trained on the base model {hf_dir.resolve()}, but this run loads" in result.stderr


def test_a_run_directory_of_another_model_is_not_resumed(run_train, tiny_config, tmp_path):
    run_train(tiny_config, tmp_path, overrides=["--train.steps", "1", "--checkpoint.save_final", "true"])
    result, _ = run_train(tiny_config, tmp_path, check=False,
                          overrides=["--train.steps", "2", "--model.name_or_path", "qwen2:debug"])
    assert result.returncode == 2 and "is a checkpoint of another model (" in result.stderr.strip().splitlines()[-1]
