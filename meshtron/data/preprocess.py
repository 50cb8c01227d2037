"""`meshtron preprocess`: raw files -> tokenized, Megatron-compatible indexed datasets.

The input is cut into contiguous work units (see sources.py), grouped into one
shard per worker. Each worker streams its records through the handler in small
batches and writes its own indexed shard; the main process shows progress, then
merges the shards in input order (so the result does not depend on --workers),
packs or annotates SFT data, and renames everything into place at the very end.
Until then every file carries a temporary name, so an interrupted run never
leaves files that look finished.
"""

import glob
import json
import logging
import multiprocessing as mp
import os
import queue
import re
import sys
import time
import traceback
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field

import numpy as np

from meshtron.data import indexed, names
from meshtron.data.handlers import BadRecord, HandlerOptions, make_handler
from meshtron.data.packing import pack_lengths, pad_ratio
from meshtron.data.sources import Unit, discover, plan_units, read_unit, split_units
from meshtron.errors import UserError

logger = logging.getLogger(__name__)

MAX_EXAMPLES = 5  # skipped-line locations kept per reason for the summary


@dataclass
class PreprocessConfig:
    inputs: list[str]
    handler: str
    tokenizer: str
    output_prefix: str
    options: HandlerOptions = field(default_factory=HandlerOptions)
    pack: bool = False
    workers: int = 1
    skip_bad_lines: bool = False
    batch_size: int = 128
    progress_interval_s: float = 1.0


@dataclass
class Stats:
    documents: int = 0
    tokens: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> lines
    examples: dict = field(default_factory=dict)  # reason -> first locations
    policy: Counter = field(default_factory=Counter)  # truncation policy outcomes

    def skip(self, where, reason: str) -> None:
        # Reasons are grouped by their kind, not their details (column, byte value).
        kind = re.split(r"[:(]", reason)[0].strip()
        self.skipped[kind] += 1
        self.examples.setdefault(kind, [])
        if len(self.examples[kind]) < MAX_EXAMPLES:
            self.examples[kind].append(str(where))

    def add(self, other: "Stats") -> None:
        self.documents += other.documents
        self.tokens += other.tokens
        self.skipped.update(other.skipped)
        self.policy.update(other.policy)
        for kind, wheres in other.examples.items():
            self.examples[kind] = (self.examples.get(kind, []) + wheres)[:MAX_EXAMPLES]


@dataclass
class Summary:
    stats: Stats
    outputs: list[str]
    elapsed_s: float
    num_sequences: int  # rows as trained: packs when packing, else samples
    pad_ratio: float | None  # at --seq-length, for SFT data


def load_tokenizer(name: str):
    """The tokenizer of an HF model or tokenizer directory, or of the example model ("smollm2") as configs accept."""
    from transformers import AutoTokenizer

    from meshtron.assets import EXAMPLE_MODEL, resolve_model_dir

    path = resolve_model_dir(name)
    if not path.is_dir():
        raise UserError(f"--tokenizer {name}: not a directory (give a Hugging Face model or tokenizer directory, "
                        f"or {EXAMPLE_MODEL!r})")
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UserError(f"--tokenizer {path}: cannot load a tokenizer: {e}") from None


def _bad(cfg: PreprocessConfig, stats: Stats, where, reason: str) -> None:
    if not cfg.skip_bad_lines:
        raise UserError(f"{where}: {reason} (to skip such lines and count them, pass --skip-bad-lines, or set "
                        "data.skip_bad_lines = true when training on raw files)")
    stats.skip(where, reason)


def _batches(units: list[Unit], size: int):
    """Batches of records, each with the input bytes of the units finished while it filled."""
    batch, done_bytes = [], 0
    for unit in units:
        for item in read_unit(unit):
            batch.append(item)
            if len(batch) == size:
                yield batch, done_bytes
                batch, done_bytes = [], 0
        done_bytes += unit.size
    yield batch, done_bytes


def run_shard(cfg: PreprocessConfig, handler, units: list[Unit], prefix: str, report) -> Stats:
    """Tokenize `units` into indexed datasets `prefix_<output>`; `report(docs, tokens, bytes)` shows progress."""
    stats = Stats()
    with ExitStack() as stack:
        writers = {
            name: stack.enter_context(indexed.IndexedWriter(f"{prefix}_{name}", dtype))
            for name, dtype in handler.outputs().items()
        }
        for batch, done_bytes in _batches(units, cfg.batch_size):
            good = []
            for where, record, error in batch:
                if error is None:
                    good.append((where, record))
                else:
                    _bad(cfg, stats, where, error)
            results = handler.encode_batch([record for _, record in good])
            docs = tokens = 0
            for (where, _), result in zip(good, results):
                if isinstance(result, BadRecord):
                    _bad(cfg, stats, where, str(result))
                elif result is not None:
                    for name, writer in writers.items():
                        writer.add_document([result[name]])
                    docs += 1
                    tokens += sum(len(a) for name, a in result.items() if "labels" not in name)
            stats.documents += docs
            stats.tokens += tokens
            report(docs, tokens, done_bytes)
    stats.policy = Counter(handler.stats)
    return stats


class Progress:
    """A progress bar with docs/s and tokens/s on stderr: one line rewritten on a terminal, else a line a while."""

    WIDTH = 20

    def __init__(self, total_bytes: int, interval_s: float, stream=None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.interval_s = interval_s if self.tty else max(interval_s, 10.0)
        self.start = self.last = time.monotonic()
        self.total_bytes = max(total_bytes, 1)
        self.docs = self.tokens = self.bytes = 0

    def update(self, docs: int, tokens: int, done_bytes: int) -> None:
        self.docs += docs
        self.tokens += tokens
        self.bytes += done_bytes
        now = time.monotonic()
        if now - self.last >= self.interval_s:
            self.last = now
            self.show()

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        fraction = min(self.bytes / self.total_bytes, 1.0)
        filled = int(fraction * self.WIDTH)
        return (f"[{'#' * filled}{'.' * (self.WIDTH - filled)}] {fraction:4.0%}  {self.docs:,} docs  "
                f"{self.tokens:,} tokens  {self.docs / elapsed:,.0f} docs/s  {self.tokens / elapsed:,.0f} tokens/s  "
                f"{elapsed:.0f}s")

    def show(self) -> None:
        self.stream.write(("\r" if self.tty else "") + self.line() + ("" if self.tty else "\n"))
        self.stream.flush()

    def close(self) -> None:
        self.show()
        if self.tty:
            self.stream.write("\n")


def _worker(cfg, handler, units, prefix, index, messages) -> None:
    """A worker process: runs one shard, reporting progress and the outcome on `messages`."""
    try:
        stats = run_shard(cfg, handler, units, prefix, lambda *counts: messages.put(("progress", index, *counts)))
        messages.put(("done", index, stats))
    except UserError as e:
        messages.put(("user_error", index, str(e)))
    except BaseException:
        messages.put(("crash", index, traceback.format_exc()))


def _run_parallel(cfg: PreprocessConfig, handler, groups, prefixes, progress: Progress) -> Stats:
    # fork: workers start at once and inherit the loaded tokenizer (loading it costs seconds).
    ctx = mp.get_context("fork")
    messages = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(cfg, handler, g, p, i, messages), daemon=True)
             for i, (g, p) in enumerate(zip(groups, prefixes))]
    for proc in procs:
        proc.start()
    results: dict[int, Stats] = {}
    try:
        while len(results) < len(procs):
            try:
                kind, index, *payload = messages.get(timeout=0.5)
            except queue.Empty:
                dead = [i for i, p in enumerate(procs) if not p.is_alive() and i not in results]
                if dead and messages.empty():
                    raise RuntimeError(f"preprocess worker {dead[0]} died (exit code {procs[dead[0]].exitcode})")
                continue
            if kind == "progress":
                progress.update(*payload)
            elif kind == "done":
                results[index] = payload[0]
            elif kind == "user_error":
                raise UserError(payload[0])
            else:
                raise RuntimeError(f"preprocess worker {index} failed:\n{payload[0]}")
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
            proc.join()
    total = Stats()
    for i in range(len(procs)):
        total.add(results[i])
    return total


def _write_sft_extras(prefix: str, cfg: PreprocessConfig) -> tuple[int, float | None]:
    """Pack the SFT samples (with --pack) and write the attention mask; rows and pad ratio."""
    ids_prefix = f"{prefix}_{names.INPUT_IDS}"
    labels_prefix = f"{prefix}_{names.LABELS}"
    ids, labels = indexed.IndexedDataset(ids_prefix), indexed.IndexedDataset(labels_prefix)
    lengths = ids.sequence_lengths.copy()
    seq_length = cfg.options.seq_length
    if cfg.pack:
        num_rows = 0
        packed_prefix = f"{prefix}.packed"
        with ExitStack() as stack:
            out_ids = stack.enter_context(indexed.IndexedWriter(f"{packed_prefix}_ids", ids.dtype))
            out_labels = stack.enter_context(indexed.IndexedWriter(f"{packed_prefix}_labels", labels.dtype))
            out_mask = stack.enter_context(indexed.IndexedWriter(f"{packed_prefix}_mask", np.int8))
            for pack in pack_lengths(lengths, seq_length):
                num_rows += 1
                out_ids.add_document([ids[i] for i in pack])
                out_labels.add_document([labels[i] for i in pack])
                out_mask.add_document([np.full(lengths[i], n, dtype=np.int8) for n, i in enumerate(pack, 1)])
        ids.close()
        labels.close()
        indexed.rename(f"{packed_prefix}_ids", ids_prefix)
        indexed.rename(f"{packed_prefix}_labels", labels_prefix)
        indexed.rename(f"{packed_prefix}_mask", f"{prefix}_{names.ATTENTION_MASK}")
    else:
        with indexed.IndexedWriter(f"{prefix}_{names.ATTENTION_MASK}", np.int8) as out_mask:
            for length in lengths:
                out_mask.add_document([np.ones(length, dtype=np.int8)])
        ids.close()
        labels.close()
        num_rows = len(lengths)
    ratio = pad_ratio(int(lengths.sum()), num_rows, seq_length) if seq_length else None
    return num_rows, ratio


def validate(cfg: PreprocessConfig, handler) -> None:
    if cfg.workers < 1:
        raise UserError(f"--workers must be at least 1, got {cfg.workers}")
    if cfg.options.seq_length is not None and cfg.options.seq_length < 1:
        raise UserError(f"--seq-length must be positive, got {cfg.options.seq_length}")
    if cfg.pack and handler.kind == "pretrain":
        raise UserError("--pack applies to SFT data; pretraining samples are cut across documents at load time")
    if cfg.pack and handler.kind == "pairwise":
        # Chosen and rejected rows must stay aligned one to one, so pairs are padded, never packed.
        logger.warning("--pack is ignored for pairwise data (each pair is one padded row); --seq-length still applies")
        cfg.pack = False
    if cfg.pack and cfg.options.seq_length is None:
        raise UserError("--pack needs --seq-length N (the most tokens in a packed sequence)")


def _tokenize(cfg: PreprocessConfig, handler, units: list[Unit], tmp: str) -> Stats:
    """Run the shards (in this process for one, else in worker processes) and merge them into `tmp_<name>`."""
    groups = split_units(units, cfg.workers)
    progress = Progress(sum(unit.size for unit in units), cfg.progress_interval_s)
    shards = [f"{tmp}.shard{i}" for i in range(max(len(groups), 1))]
    if len(groups) <= 1:
        stats = run_shard(cfg, handler, units, shards[0], progress.update)
    else:
        stats = _run_parallel(cfg, handler, groups, shards, progress)
    progress.close()
    for name, dtype in handler.outputs().items():
        if len(shards) == 1:
            indexed.rename(f"{shards[0]}_{name}", f"{tmp}_{name}")
            continue
        with indexed.IndexedWriter(f"{tmp}_{name}", dtype) as writer:
            for shard in shards:
                writer.merge(f"{shard}_{name}")
                indexed.remove(f"{shard}_{name}")
    return stats


def preprocess(cfg: PreprocessConfig) -> Summary:
    start = time.monotonic()
    # --workers is the parallelism: the tokenizer's own threads would compete with the workers
    # for the same cores (set TOKENIZERS_PARALLELISM=true to use them anyway).
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    files = discover(cfg.inputs)
    # Built once, before any work starts (a bad handler name, template or option fails here);
    # workers inherit it.
    handler = make_handler(cfg.handler, load_tokenizer(cfg.tokenizer), cfg.options)
    validate(cfg, handler)
    units, empty = plan_units(files, cfg.workers)
    stats = Stats()
    for path in empty:
        _bad(cfg, stats, f"{path}:1", "file is empty")
    os.makedirs(os.path.dirname(os.path.abspath(cfg.output_prefix)), exist_ok=True)
    # Everything is written under this prefix and renamed only once all of it is complete.
    tmp = f"{cfg.output_prefix}.incomplete-{os.getpid()}"
    try:
        stats.add(_tokenize(cfg, handler, units, tmp))
        if stats.documents == 0:
            raise UserError("no usable samples in the input" + (" (every line was skipped)" if stats.skipped else ""))
        written = list(handler.outputs())
        num_rows, ratio = stats.documents, None
        if handler.kind == "sft":
            num_rows, ratio = _write_sft_extras(tmp, cfg)
            written.append(names.ATTENTION_MASK)
        metadata = handler.metadata()
        if metadata is not None:
            with open(f"{tmp}_{handler.name}.json", "w") as f:
                json.dump(metadata, f, indent=2)
        for name in written:
            indexed.rename(f"{tmp}_{name}", f"{cfg.output_prefix}_{name}")
        if metadata is not None:
            os.replace(f"{tmp}_{handler.name}.json", f"{cfg.output_prefix}_{handler.name}.json")
    finally:
        for path in glob.glob(glob.escape(tmp) + "*"):
            os.remove(path)
    outputs = [f"{cfg.output_prefix}_{name}" for name in written]
    return Summary(stats, outputs, time.monotonic() - start, num_rows, ratio)


def format_summary(summary: Summary, cfg: PreprocessConfig) -> str:
    stats = summary.stats
    lines = [f"done in {summary.elapsed_s:.1f}s: {stats.documents:,} samples, {stats.tokens:,} tokens "
             f"({stats.tokens / max(summary.elapsed_s, 1e-9):,.0f} tokens/s)"]
    if cfg.pack:
        lines.append(f"packed into {summary.num_sequences:,} sequences of at most {cfg.options.seq_length} tokens")
    if summary.pad_ratio is not None:
        lines.append(f"pad ratio at --seq-length {cfg.options.seq_length}: {summary.pad_ratio:.1%}")
    for outcome, count in sorted(stats.policy.items()):
        lines.append(f"{outcome} (--truncation {cfg.options.truncation}): {count:,}")
    skipped = sum(stats.skipped.values())
    lines.append(f"skipped lines: {skipped:,}")
    for kind, count in stats.skipped.most_common():
        lines.append(f"  {kind}: {count:,} (e.g. {', '.join(stats.examples[kind])})")
    lines += [f"wrote {prefix}.bin/.idx" for prefix in summary.outputs]
    return "\n".join(lines)
