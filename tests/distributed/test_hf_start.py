"""Training from a Hugging Face directory: the weights stream tensor by tensor into FSDP and TP
shards, so the first losses at every layout equal the single-process ones."""

import pytest


@pytest.mark.parametrize("nproc, layout", [(2, ["--parallel.dp_shard", "2"]),
                                           (2, ["--parallel.tp", "2", "--parallel.dp_shard", "1"])],
                         ids=["fsdp2", "tp2"])
def test_hf_weights_stream_into_shards(run_train, tiny_config, hf_dir, tmp_path, nproc, layout):
    start = ["--model.name_or_path", str(hf_dir), "--train.steps", "2"]
    _, single = run_train(tiny_config, tmp_path / "single", overrides=start)
    _, sharded = run_train(tiny_config, tmp_path / "sharded", nproc=nproc, overrides=[*start, *layout])
    assert [r["loss"] for r in sharded] == pytest.approx([r["loss"] for r in single], rel=2e-5)
    # The pretrained weights were loaded (a fresh init with init_std 0.02 starts at ln(1024) = 6.93).
    assert abs(single[0]["loss"] - 6.93) > 0.01
