"""Replica fault tolerance with torchft ([ft]): two replica groups train together through a
lighthouse; one is killed and the other trains on alone; a replacement joins, heals from the
survivor, and from then on the two hold the same weights, to the end of the run."""

import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

torchft = pytest.importorskip("torchft")

STEPS = 300


class ReplicaGroup:
    """One replica group's `meshtron train` under torchrun; its output goes to a file (torchft logs a
    lot: a pipe read only at the end would fill up and block the process)."""

    def __init__(self, tiny_config, out, group: int, env: dict):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1", "-m",
               "meshtron", "train", str(tiny_config), "--train.output_dir", str(out), "--train.steps", str(STEPS),
               "--lr.schedule", "constant", "--checkpoint.save_final", "true", "--ft.enable", "true",
               "--ft.replica_group", str(group), "--ft.num_replica_groups", "2", "--ft.timeout_s", "20"]
        self.out = out
        self.log = out.parent / f"{out.name}.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                         env=dict(os.environ, OMP_NUM_THREADS="1", **env))

    def finish(self, timeout: float) -> tuple[int, str]:
        """(exit status, output)."""
        self.proc.wait(timeout=timeout)
        return self.proc.returncode, self.log.read_text()

    def wait_for_steps(self, n: int, deadline: float) -> None:
        metrics = self.out / "metrics.jsonl"
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= n):
            assert self.proc.poll() is None and time.time() < deadline, self.log.read_text()[-3000:]
            time.sleep(0.2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_dead_replica_group_is_replaced_and_heals(tiny_config, tmp_path):
    import torch

    from meshtron.checkpoint import load_for_inference

    port = free_port()
    # The lighthouse as users run it (the command torchft installs).
    lighthouse = subprocess.Popen([shutil.which("torchft_lighthouse"), "--min_replicas", "1", "--join_timeout_ms",
                                   "2000", "--bind", f"[::]:{port}"], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
    # Every step takes 0.3 s more: the survivor runs on alone for about 90 s, time for the replacement to start.
    env = {"TORCHFT_LIGHTHOUSE": f"http://localhost:{port}", "MESHTRON_FAULT_SLOW_S": "0.3"}
    deadline = time.time() + 400
    groups = []
    try:
        survivor = ReplicaGroup(tiny_config, tmp_path / "g0", 0, env)
        # (Step 20: the second group joins, healing, at whatever step the first has reached by then.)
        doomed = ReplicaGroup(tiny_config, tmp_path / "g1", 1, {**env, "MESHTRON_FAULT_AT_STEP": "20"})
        groups += [survivor, doomed]
        code, doomed_log = doomed.finish(timeout=300)
        assert code != 0 and "kills this rank" in doomed_log, doomed_log[-3000:]
        survivor.wait_for_steps(22, deadline)  # the survivor trains on alone

        replacement = ReplicaGroup(tiny_config, tmp_path / "g1-new", 1, env)
        groups.append(replacement)
        code, replacement_log = replacement.finish(timeout=300)
        assert code == 0, replacement_log[-3000:]
        code, survivor_log = survivor.finish(timeout=300)
        assert code == 0, survivor_log[-3000:]
    finally:
        for process in [group.proc for group in groups] + [lighthouse]:
            process.kill()  # (those still running after a failure)
            process.wait()
    assert "dropped: a replica group failed during it" in survivor_log
    assert "healed from a live replica group" in replacement_log

    survived, _, _ = load_for_inference(tmp_path / "g0")
    healed, _, _ = load_for_inference(tmp_path / "g1-new")
    for (name, a), (_, b) in zip(survived.state_dict().items(), healed.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    two = [line for line in survivor_log.splitlines() if "got lighthouse quorum" in line and "meshtron_1" in line]
    assert two, "the two replica groups never trained together"
    first_step = int(replacement_log.split("now at step ")[1].split()[0])
    assert first_step > 22  # it started where the survivor was, not from step 0
