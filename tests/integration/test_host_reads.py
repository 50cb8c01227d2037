"""A training step waits for the device once: the check that decides whether the optimizer steps,
which brings the step's metrics with it (before: the token count before the forward, then the loss,
the gradient norm, the count again and each recipe metric, one wait each).

On CPU nothing waits, so the test counts what would: reads of a tensor's value (`item`, `tolist`,
`bool`/`float`/`int` of a tensor) made by the step's own code (the trainer, its guard, recipes and
losses). Data loading reads host tensors before they move to the device, and torch's optimizers
read their host-side step counters; neither is counted. The per-batch mask description reads the
batch's document boundaries (models/common/masks.py): also not counted here, see docs/training.md.

It runs on two data-parallel ranks, and also counts the collectives the loop's own code (trainer and
guard) issues per step: the token count, the loss and the finite check, which also carries a stop
request (SIGTERM), so there is no world-wide stop-flag all-reduce of its own."""

import json
import os
import subprocess
import sys
from pathlib import Path

TINY = """
[model]
name_or_path = "llama:debug"
[data]
mock = true
[train]
steps = 3
global_batch_size = 4
micro_batch_size = 2
seq_length = 32
[log]
tensorboard = false
plot = false
[checkpoint]
save_final = false
"""

COUNTER = '''
import json, os, sys
import torch
import torch.distributed as dist
from meshtron.cli import main
from meshtron.train.trainer import Trainer

STEP_CODE = ("/meshtron/train/trainer.py", "/meshtron/train/guard.py", "/meshtron/train/recipes/",
             "/meshtron/train/losses.py", "/meshtron/train/metrics.py")
reads, inside, per_step = [], [False], []
collectives = []  # per step (from one step's start to the next's): the loop's own collectives

def counting(name):
    original = getattr(torch.Tensor, name)
    def wrapper(self, *args, **kwargs):
        if inside[0]:
            frame = sys._getframe(1)
            if any(part in frame.f_code.co_filename for part in STEP_CODE):
                reads.append(f"{name} at {frame.f_code.co_filename.split('/meshtron/')[-1]}:{frame.f_lineno}")
        return original(self, *args, **kwargs)
    return wrapper

for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
    setattr(torch.Tensor, name, counting(name))
original_all_reduce = dist.all_reduce

def counted_all_reduce(*args, **kwargs):
    frame = sys._getframe(1)
    if collectives and frame.f_code.co_filename.endswith(("/meshtron/train/trainer.py", "/meshtron/train/guard.py")):
        collectives[-1].append(f"{frame.f_code.co_name}:{frame.f_lineno}")
    return original_all_reduce(*args, **kwargs)

dist.all_reduce = counted_all_reduce
train_step, guarded = Trainer.train_step, Trainer._guarded_train_step

def counted_guarded(self, *args):
    collectives.append([])
    return guarded(self, *args)

Trainer._guarded_train_step = counted_guarded

def counted(self):
    reads.clear()
    inside[0] = True
    try:
        return train_step(self)
    finally:
        inside[0] = False
        per_step.append(list(reads))

train = Trainer.train

def counted_train(self):
    try:
        return train(self)
    finally:  # here: under torchrun the command leaves with os._exit
        with open(os.environ["COUNTS"] + os.environ["RANK"], "w") as f:
            json.dump({"reads": per_step, "collectives": collectives}, f)

Trainer.train_step, Trainer.train = counted, counted_train
main(sys.argv[1:])
'''


def test_a_training_step_reads_from_the_device_once(tmp_path):
    (tmp_path / "count.py").write_text(COUNTER)
    (tmp_path / "tiny.toml").write_text(TINY)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                             str(tmp_path / "count.py"), "train", str(tmp_path / "tiny.toml"),
                             "--train.output_dir", str(tmp_path / "run"), "--parallel.dp_shard", "2"],
                            capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS="1", COUNTS=str(tmp_path / "counts-")),
                            cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in range(2):
        counts = json.loads((tmp_path / f"counts-{rank}").read_text())
        assert len(counts["reads"]) == len(counts["collectives"]) == 3
        for reads in counts["reads"]:
            assert len(reads) == 1 and reads[0].startswith("tolist at train/guard.py"), reads
        for collectives in counts["collectives"]:
            sites = [site.split(":")[0] for site in collectives]
            assert sorted(sites) == ["_dp_sum", "_loss_sum", "finite_on_every_rank"], collectives
