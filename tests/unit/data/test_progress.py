"""The preprocess progress line and summary."""

import io
from collections import Counter

from meshtron.data.handlers import HandlerOptions
from meshtron.data.preprocess import PreprocessConfig, Progress, Stats, Summary, format_summary


def test_progress_bar_shows_share_and_rates():
    stream = io.StringIO()
    progress = Progress(total_bytes=200, interval_s=0.0, stream=stream)
    progress.update(10, 1000, 100)
    assert stream.getvalue() == ""  # not a terminal: at most one line every 10 s
    progress.close()
    line = stream.getvalue().strip().splitlines()[-1]
    assert line.startswith("[##########..........]  50%  10 docs  1,000 tokens")
    assert "docs/s" in line and "tokens/s" in line


def test_summary_reports_skips_policy_and_packing():
    stats = Stats(documents=3, tokens=300, policy=Counter({"truncated to --seq-length": 2}))
    stats.skip("a.jsonl:4", "malformed JSON: Expecting value at column 1")
    stats.skip("a.jsonl:9", "malformed JSON: Expecting ',' delimiter at column 7")
    cfg = PreprocessConfig(["a.jsonl"], "alpaca", "tok", "out", HandlerOptions(seq_length=128), pack=True)
    text = format_summary(Summary(stats, ["out_packed_input_ids_document"], 2.0, 2, 0.25), cfg)
    assert "3 samples, 300 tokens" in text
    assert "packed into 2 sequences of at most 128 tokens" in text and "pad ratio at --seq-length 128: 25.0%" in text
    assert "truncated to --seq-length (--truncation right): 2" in text
    assert "skipped lines: 2" in text and "malformed JSON: 2 (e.g. a.jsonl:4, a.jsonl:9)" in text
