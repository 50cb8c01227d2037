"""The end-of-run sample reloads the final model whole on rank 0's CPU: skipped, with a message, above 3B parameters."""

from meshtron.models.registry import get_flavor
from meshtron.train.trainer import sample_skip_reason


def test_small_models_get_a_sample():
    assert sample_skip_reason(get_flavor("llama:smollm2-135m").num_params()) is None
    assert sample_skip_reason(get_flavor("llama:llama3.2-1b").num_params()) is None


def test_an_8b_model_is_skipped_with_the_memory_it_would_take_and_what_to_run_instead():
    reason = sample_skip_reason(get_flavor("llama:llama3-8b").num_params())
    assert "8.0B parameters" in reason and "(32 GB)" in reason
    assert "meshtron generate --model OUTPUT_DIR" in reason
