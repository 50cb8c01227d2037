"""PipelineLayout: layers per stage, stages per rank, and the layouts it refuses (with what to change)."""

import pytest

from meshtron.errors import UserError
from meshtron.parallel.pipeline import PipelineLayout, prune_to_stage


def layout(**kwargs):
    defaults = dict(pp=2, vpp=1, schedule="", pp_layers=[], num_layers=8, n_microbatches=4)
    return PipelineLayout.resolve(**{**defaults, **kwargs})


def test_even_split_gives_the_remainder_to_the_earlier_stages():
    lay = layout(num_layers=7, pp=3, n_microbatches=3)
    assert [len(s) for s in lay.stage_layers] == [3, 2, 2]
    assert lay.stage_layers[0] == (0, 1, 2) and lay.stage_layers[-1] == (5, 6)
    assert lay.schedule == "1f1b"


def test_explicit_layer_list():
    lay = layout(pp_layers=[5, 3])
    assert lay.stage_layers == ((0, 1, 2, 3, 4), (5, 6, 7))


def test_virtual_stages_loop_over_ranks_and_default_to_interleaved():
    lay = layout(vpp=2)
    assert lay.schedule == "interleaved_1f1b" and lay.num_stages == 4
    assert lay.stages_of_rank(0) == [0, 2] and lay.stages_of_rank(1) == [1, 3]
    assert [len(s) for s in lay.stage_layers] == [2, 2, 2, 2]


def test_zbv_puts_the_first_and_last_stage_on_rank_zero():
    lay = layout(schedule="zbv")
    assert lay.num_stages == 4
    assert lay.stages_of_rank(0) == [0, 3] and lay.stages_of_rank(1) == [1, 2]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_layers=3, vpp=2), "the model has 3 layers, fewer than the 4 pipeline stages (pp x vpp = 2 x 2)"),
        (dict(pp_layers=[4, 3]), "sums to 7, but the model has 8 layers"),
        (dict(pp_layers=[8]), "has 1 entries for 2 pipeline stages"),
        (dict(pp_layers=[8, 0]), "every stage needs at least one layer"),
        (dict(n_microbatches=1), "needs at least 2 micro-batches per step"),
        (dict(vpp=2, n_microbatches=3), "needs at least 2 and a multiple of pp = 2 micro-batches"),
        (dict(schedule="zbv", n_microbatches=2), "zbv with pp = 2 needs at least 4 micro-batches"),
        (dict(schedule="1f1b", vpp=2), "runs one stage per rank, but vpp = 2"),
        (dict(schedule="interleaved_1f1b"), "set vpp >= 2"),
        (dict(schedule="zbv", vpp=3), "runs exactly two stages per rank"),
    ],
)
def test_impossible_layouts(kwargs, message):
    with pytest.raises(UserError) as info:
        layout(**kwargs)
    assert message in str(info.value)


def test_gpipe_runs_with_a_single_micro_batch():
    assert layout(schedule="gpipe", n_microbatches=1).n_microbatches == 1


def test_a_stage_keeps_its_layers_under_their_global_names():
    from meshtron.models.registry import build_model, get_flavor
    from dataclasses import replace

    args = replace(get_flavor("llama:debug"), num_layers=4)
    middle = prune_to_stage(build_model(args, device="meta"), (1, 2), first=False, last=False)
    assert list(middle.layers) == ["1", "2"]
    assert middle.embed is None and middle.lm_head is None and middle.norm is None
    names = {n for n, _ in middle.named_parameters()}
    assert "layers.1.attn.q_proj.weight" in names and not any(n.startswith("layers.0.") for n in names)
