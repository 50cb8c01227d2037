"""An error every torchrun rank raises is printed once, not once per rank."""

import os
import subprocess
import sys


def test_an_error_of_every_rank_is_printed_once(tiny_config, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "meshtron",
           "train", str(tiny_config), "--train.output_dir", str(tmp_path), "--parallel.dp_shard", "2",
           "--train.global_batch_size", "6"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                            timeout=300)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if "meshtron train: error:" in line]
    assert len(errors) == 1 and "global_batch_size (6) must be a multiple" in errors[0], result.stderr[-3000:]
