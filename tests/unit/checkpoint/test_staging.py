"""Asynchronous saves stage the state through one host buffer kept from save to save."""

import torch

from meshtron.checkpoint.manager import staging_buffer


def test_a_second_save_stages_into_the_first_saves_buffer_with_the_new_values():
    weight = torch.arange(6, dtype=torch.float32)
    stager = staging_buffer()
    first = stager.stage({"w": weight})["w"]
    first_values = first.clone()
    weight.mul_(2)  # the next step changed the parameter in place
    second = stager.stage({"w": weight})["w"]
    assert second.data_ptr() == first.data_ptr()  # no new allocation
    assert second.data_ptr() != weight.data_ptr()  # a copy, which training may change no more
    assert torch.equal(second, weight) and torch.equal(first_values, torch.arange(6, dtype=torch.float32))
    stager.close()
