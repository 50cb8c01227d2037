"""The [profile] section: two quickstart steps traced as gzipped Chrome-trace JSON with the step's
regions named, the regions drawn, and the step-time breakdown adding up to the step time; the
memory view on CPU."""

import gzip
import json
import os
from pathlib import Path

import pytest

from meshtron.train.profiling import read_regions
from launch import run_meshtron

REPO = Path(__file__).resolve().parents[2]
PHASES = ("data", "forward_backward", "optimizer", "eval", "checkpoint")


def train(config: Path, out: Path, *overrides: str):
    result = run_meshtron(["train", config, "--train.output_dir", out, *overrides], timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.smollm2
def test_two_quickstart_steps_profiled(tmp_path, smollm2_dir):
    out = tmp_path / "run"
    records = train(REPO / "configs" / "quickstart.toml", out, "--train.steps", "3", "--profile.enable", "true",
                    "--profile.start_step", "2", "--profile.num_steps", "2", "--train.sample_prompt", "",
                    "--log.plot", "false", "--log.tensorboard", "false", "--checkpoint.save_final", "false",
                    "--train.seq_length", "128", "--train.global_batch_size", "4", "--train.micro_batch_size", "4")
    trace = out / "profile" / "step-2-3" / "rank-0.trace.json.gz"
    with gzip.open(trace, "rt") as f:
        events = json.load(f)["traceEvents"]  # valid Chrome-trace JSON
    steps = {e["name"] for e in events if e.get("name", "").startswith("ProfilerStep#")}
    assert len(steps) == 2  # exactly the two profiled steps (the warm-up step is not in the trace)
    names = [r["name"] for r in read_regions(trace)]
    assert {"data", "forward", "backward", "forward_backward", "optimizer"} <= set(names)
    assert names.count("optimizer") == 2
    assert (out / "profile" / "step-2-3" / "rank-0.regions.png").stat().st_size > 0

    for r in records:
        assert sum(r[f"time_{p}_s"] for p in PHASES) == pytest.approx(r["step_time_s"], rel=0.1)
        assert r["time_forward_backward_s"] > 0 and r["time_optimizer_s"] > 0


def test_memory_view_on_cpu(tmp_path):
    config = tmp_path / "tiny.toml"
    config.write_text('[data]\nmock = true\n[train]\nsteps = 2\nglobal_batch_size = 2\nmicro_batch_size = 2\n'
                      'seq_length = 32\n[log]\ntensorboard = false\nplot = false\n[checkpoint]\nsave_final = false\n')
    train(config, tmp_path / "run", "--profile.enable", "true", "--profile.start_step", "2", "--profile.num_steps",
          "1", "--profile.memory_snapshot", "true")
    html = (tmp_path / "run" / "profile" / "step-2-2" / "rank-0.memory.html").read_text()
    assert "MemoryViz.js" in html and "snapshot.pickle" in html  # torch's memory viewer with the data embedded
