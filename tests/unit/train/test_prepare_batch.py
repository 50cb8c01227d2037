"""A batch is prepared once with the description of its attention mask and its position ids; the
model run on a prepared batch computes what it computes from the batch's document ids."""

import functools

import torch

from meshtron.config import load_config
from meshtron.models.common.masks import AttentionMask
from meshtron.models.registry import build_model, get_flavor
from meshtron.train.data import MockDataLoader
from meshtron.train.losses import head_cross_entropy_sum
from meshtron.train.recipes import build_recipe


def _model():
    model = build_model(get_flavor("llama:debug"), device="meta")
    model.to_empty(device="cpu")
    model.init_weights(seed=1)
    return model


def _recipe(*overrides):
    return build_recipe(load_config(None, ["--data.mock", "true", *overrides]))


def _mock_batch(seq_length=24, rows=3):
    return next(iter(MockDataLoader(1024, seq_length, rows, dp_rank=0, dp_size=1, seed=0)))


def test_prepared_batch_carries_its_mask_and_matches_document_ids():
    batch = _mock_batch()
    prepared = _recipe("--model.attention", "varlen").prepare_batch(batch)
    mask = prepared["mask"]
    assert isinstance(mask, AttentionMask) and mask.backend == "varlen"
    assert torch.equal(mask.document_ids, batch["document_ids"])  # mock rows hold two documents each
    model = _model()
    model.set_attention("varlen")
    with torch.no_grad():
        given = model(prepared["input_ids"], position_ids=prepared["position_ids"], mask=mask)
        built = model(batch["input_ids"], document_ids=batch["document_ids"])
    assert torch.equal(given, built)


def test_recipe_loss_on_a_prepared_batch_equals_the_loss_from_document_ids():
    batch = _mock_batch()
    recipe = _recipe()
    model = _model()
    with torch.no_grad():
        loss = recipe.loss_sum(model, recipe.prepare_batch(batch))
        reference = model(batch["input_ids"], document_ids=batch["document_ids"],
                          head=functools.partial(head_cross_entropy_sum, labels_BS=batch["labels"]))
    assert torch.equal(loss, reference)


def test_positions_are_derived_when_the_batch_is_prepared():
    batch = _mock_batch()
    assert torch.equal(_recipe().prepare_batch(batch)["position_ids"], batch["position_ids"])  # restarting
    flat = _recipe("--data.reset_position_ids", "false").prepare_batch(batch)["position_ids"]
    assert torch.equal(flat, torch.arange(24).expand(3, 24))
    assert not torch.equal(flat, batch["position_ids"])


def test_pairwise_batch_is_prepared_as_chosen_then_rejected_rows():
    gen = torch.Generator().manual_seed(0)
    rows = {}
    for side, cut in (("chosen", 5), ("rejected", 7)):
        docs = torch.zeros(2, 10, dtype=torch.long)
        docs[:, cut:] = 1  # the padding after the response is a document of its own
        rows.update({f"{side}_input_ids": torch.randint(0, 1024, (2, 10), generator=gen),
                     f"{side}_labels": torch.randint(0, 1024, (2, 10), generator=gen),
                     f"{side}_document_ids": docs, f"{side}_position_ids": torch.arange(10).expand(2, 10)})
    prepared = _recipe("--train.recipe", "dpo").prepare_batch(rows)
    assert torch.equal(prepared["input_ids"], torch.cat([rows["chosen_input_ids"], rows["rejected_input_ids"]]))
    assert torch.equal(prepared["mask"].document_ids,
                       torch.cat([rows["chosen_document_ids"], rows["rejected_document_ids"]]))
