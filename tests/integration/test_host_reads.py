"""A training step waits for the device once: the check that decides whether the optimizer steps,
which brings the step's metrics with it (before: the token count before the forward, then the loss,
the gradient norm, the count again and each recipe metric, one wait each).

On CPU nothing waits, so the test counts what would: reads of a tensor's value (`item`, `tolist`,
`bool`/`float`/`int` of a tensor) made by the step's own code (the trainer, its guard, recipes and
losses). Data loading reads host tensors before they move to the device, and torch's optimizers
read their host-side step counters; neither is counted. The per-batch mask description reads the
batch's document boundaries (models/common/masks.py): also not counted here, see docs/training.md."""

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
import json, sys
import torch
from meshtron.cli import main
from meshtron.train.trainer import Trainer

STEP_CODE = ("/meshtron/train/trainer.py", "/meshtron/train/guard.py", "/meshtron/train/recipes/",
             "/meshtron/train/losses.py", "/meshtron/train/metrics.py")
reads, inside, per_step = [], [False], []

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
train_step = Trainer.train_step

def counted(self):
    reads.clear()
    inside[0] = True
    try:
        return train_step(self)
    finally:
        inside[0] = False
        per_step.append(list(reads))

Trainer.train_step = counted
try:
    main(sys.argv[1:])
finally:
    print("READS " + json.dumps(per_step))
'''


def test_a_training_step_reads_from_the_device_once(tmp_path):
    (tmp_path / "count.py").write_text(COUNTER)
    (tmp_path / "tiny.toml").write_text(TINY)
    result = subprocess.run([sys.executable, str(tmp_path / "count.py"), "train", str(tmp_path / "tiny.toml"),
                             "--train.output_dir", str(tmp_path / "run")],
                            capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                            cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("READS "))
    per_step = json.loads(line[len("READS "):])
    assert len(per_step) == 3
    for reads in per_step:
        assert len(reads) == 1 and reads[0].startswith("tolist at train/guard.py"), reads
