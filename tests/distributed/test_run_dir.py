"""Many nodes, one run directory: every rank must see the directory rank 0 created.

MESHTRON_FAULT_PRIVATE_RUN_DIR=1 gives the picked rank a directory of its own (PATH-rankR), as a
node-local disk on a second node would.
"""


def test_a_rank_that_sees_another_run_directory_stops_the_run_with_one_clear_line(run_train, tiny_config, tmp_path):
    result, records = run_train(tiny_config, tmp_path / "run", nproc=2, check=False,
                                env={"MESHTRON_FAULT_PRIVATE_RUN_DIR": "1", "MESHTRON_FAULT_RANK": "1"})
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("meshtron train: error:")]
    assert len(errors) == 1 and "rank(s) 1 do not see the run directory rank 0 created" in errors[0]
    assert "meshtron/train/trainer.py" not in result.stderr  # one line, no traceback of ours
    assert records == []  # stopped before the first step

