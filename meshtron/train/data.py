"""The trainer's data: the stateful loader of meshtron.data over preprocessed prefixes (raw files
are preprocessed on the fly first), or deterministic mock data for benchmarks and tests.

Both loaders shard a global stream of samples by data-parallel rank and checkpoint the number
of samples consumed by all ranks, so a resumed run (at any dp size) continues with the next
unseen sample.
"""

import copy
import hashlib
import logging
import queue
import threading
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.stateful import Stateful

from meshtron.config import JobConfig
from meshtron.data import names
from meshtron.errors import UserError
from meshtron.train.losses import IGNORE_INDEX

log = logging.getLogger(__name__)

RAW_SUFFIXES = (".jsonl", ".json", ".parquet", ".txt", ".arrow")


class MockDataLoader(Stateful):
    """Deterministic synthetic micro-batches: each sample holds two documents, each an arithmetic
    sequence of token ids modulo the vocabulary, so a model can learn it and its loss falls.
    A random-length head of the first document takes no loss, like an SFT prompt, so samples
    differ in their number of loss tokens (which makes the loss normalization observable).

    Sample i depends only on (seed, i); rank r of a round takes samples r, r + dp_size, ... like
    the real loader.
    """

    def __init__(self, vocab_size: int, seq_length: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                 seed: int):
        self.vocab_size, self.seq_length = vocab_size, seq_length
        self.micro_batch_size, self.dp_rank, self.dp_size, self.seed = micro_batch_size, dp_rank, dp_size, seed
        self.consumed_samples = 0

    def sample(self, index: int) -> dict[str, torch.Tensor]:
        S = self.seq_length
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        cut = int(torch.randint(S // 4, 3 * S // 4 + 1, (1,), generator=gen))
        starts = torch.randint(0, self.vocab_size, (2,), generator=gen)
        strides = torch.randint(1, 8, (2,), generator=gen)
        lengths = (cut, S + 1 - cut)
        tokens = torch.cat([(starts[d] + strides[d] * torch.arange(lengths[d])) % self.vocab_size for d in range(2)])
        document_ids = torch.cat([torch.zeros(cut, dtype=torch.long), torch.ones(S - cut, dtype=torch.long)])
        labels = tokens[1:].clone()
        labels[cut - 1] = IGNORE_INDEX  # the first token of the next document is not predictable
        labels[: int(torch.randint(0, cut // 2 + 1, (1,), generator=gen))] = IGNORE_INDEX
        positions = torch.cat([torch.arange(cut), torch.arange(S - cut)])
        return {"input_ids": tokens[:-1], "labels": labels, "document_ids": document_ids, "position_ids": positions}

    def __iter__(self):
        while True:
            start = self.consumed_samples + self.dp_rank
            samples = [self.sample(start + j * self.dp_size) for j in range(self.micro_batch_size)]
            self.consumed_samples += self.micro_batch_size * self.dp_size
            yield {key: torch.stack([s[key] for s in samples]) for key in samples[0]}

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state_dict: dict) -> None:
        self.consumed_samples = int(state_dict["consumed_samples"])


class PrefetchLoader(Stateful):
    """Prepares the next `depth` micro-batches of `loader` in a background thread.

    The checkpointed position is that of the last batch the trainer took, not of the batches
    prepared ahead, so resuming never skips a sample.
    """

    def __init__(self, loader: Stateful, depth: int):
        self.loader, self.depth = loader, depth
        self._state = loader.state_dict()

    def __iter__(self):
        ready: queue.Queue = queue.Queue(maxsize=self.depth)

        def produce():
            for batch in self.loader:
                ready.put((batch, copy.deepcopy(self.loader.state_dict())))

        threading.Thread(target=produce, daemon=True, name="meshtron-data").start()
        while True:
            batch, self._state = ready.get()
            yield batch

    def state_dict(self) -> dict:
        return self._state

    def load_state_dict(self, state_dict: dict) -> None:
        self.loader.load_state_dict(state_dict)
        self._state = self.loader.state_dict()


def build_data_loader(config: JobConfig, *, data_kind: str, default_handler: str, vocab_size: int,
                      tokenizer_dir: Path | None, dp_rank: int, dp_size: int, config_dir: Path | None) -> Stateful:
    train = config.train
    if data_kind == "prompts":
        from meshtron.data.prompts import PromptLoader

        prompts = build_training_dataset(config, config.data.paths, [], data_kind=data_kind, default_handler="",
                                         tokenizer_dir=tokenizer_dir, config_dir=config_dir)
        return PromptLoader(prompts, config.rl.prompts_per_step, dp_rank, dp_size, train.seed)
    if config.data.mock:
        loader = MockDataLoader(vocab_size, train.seq_length, train.micro_batch_size, dp_rank, dp_size, train.seed)
    else:
        from meshtron.data.loader import DataLoader

        dataset = build_training_dataset(config, config.data.paths, config.data.weights, data_kind=data_kind,
                                         default_handler=default_handler, tokenizer_dir=tokenizer_dir,
                                         config_dir=config_dir)
        loader = DataLoader(dataset, train.micro_batch_size, dp_rank, dp_size, train.seed)
    return PrefetchLoader(loader, config.data.num_workers) if config.data.num_workers else loader


def build_training_dataset(config: JobConfig, paths: list[str], weights: list[float], *, data_kind: str,
                           default_handler: str, tokenizer_dir: Path | None, config_dir: Path | None):
    """The dataset over `paths` (prefixes or raw files, preprocessed on the fly); for RL, the prompts."""
    from meshtron.data.loader import build_dataset

    if data_kind == "prompts":
        return _read_prompts(config, paths, tokenizer_dir, config_dir)

    prefixes = [_resolve_path(p, config, data_kind, _handler_of(p, config, default_handler), tokenizer_dir,
                              config_dir) for p in paths]
    return build_dataset(prefixes, weights or None, config.train.seq_length, data_kind, config.train.seed,
                         reset_position_ids=config.data.reset_position_ids)


def _read_prompts(config: JobConfig, paths: list[str], tokenizer_dir: Path | None, config_dir: Path | None):
    from transformers import AutoTokenizer

    from meshtron.data.prompts import read_prompts

    if tokenizer_dir is None:
        raise UserError(f"the {config.train.recipe} recipe needs a tokenizer with a chat template; set model.tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    return read_prompts([str(_find(p, config_dir)) for p in paths], tokenizer, config.data)


def _handler_of(path: str, config: JobConfig, default_handler: str) -> str:
    return config.data.handlers.get(path) or config.data.handler or default_handler


def _pass_plan(num_samples: int, micro_batch_size: int, dp_size: int, whole_rounds: bool) -> tuple[int, bool]:
    """(whole rounds, whether the rest runs as one smaller micro-batch per rank) of `one_pass`."""
    full, rest = divmod(num_samples, micro_batch_size * dp_size)
    return full, rest >= dp_size and not whole_rounds


def one_pass_coverage(num_samples: int, micro_batch_size: int, dp_size: int, whole_rounds: bool = False) -> int:
    """How many samples `one_pass` covers: all of them, but where its last round cannot be run (see there)."""
    full, partial_round = _pass_plan(num_samples, micro_batch_size, dp_size, whole_rounds)
    if partial_round or full == 0:
        return num_samples  # (a pass shorter than one round that cannot run smaller covers all, some twice)
    return full * micro_batch_size * dp_size


def dropped_samples_note(num_samples: int, micro_batch_size: int, dp_size: int,
                         whole_rounds: bool = False) -> str | None:
    """What a user should read when one pass over the held-out data leaves samples out or counts some
    twice (None when it covers each once)."""
    round_size = micro_batch_size * dp_size
    sizes = f"micro_batch_size x data-parallel size = {micro_batch_size} x {dp_size} = {round_size}"
    full, partial_round = _pass_plan(num_samples, micro_batch_size, dp_size, whole_rounds)
    if full == 0 and not partial_round:
        return (f"held-out evaluation has {num_samples} samples, fewer than one round of {sizes}: its one round "
                f"repeats samples to fill {round_size} places, so some count more than once")
    covered = one_pass_coverage(num_samples, micro_batch_size, dp_size, whole_rounds)
    if covered == num_samples:
        return None
    why = ("a pipeline runs whole micro-batches" if whole_rounds else
           f"its last {num_samples - covered} are fewer than one per data-parallel rank")
    return (f"held-out evaluation covers {covered} of the {num_samples} samples of data.eval_paths (rows of "
            f"seq_length tokens; pairs for pairwise data) and leaves the last {num_samples - covered} out: {why}; a "
            f"sample count divisible by {round_size} covers them all")


def one_pass(dataset, micro_batch_size: int, dp_rank: int, dp_size: int, whole_rounds: bool = False):
    """The micro-batches of one in-order pass over `dataset` for this rank: whole rounds of micro_batch_size x
    dp_size samples (rank r takes r, r + dp_size, ... of each), then the rest in smaller micro-batches, one
    per rank, when there is at least one sample for every rank (every rank runs the same number of
    forwards). With `whole_rounds` (a pipeline's fixed micro-batch shape), or fewer than one sample per rank,
    the rest is left out; a pass shorter than one round wraps around to fill it. `dropped_samples_note`
    says what a user should know."""
    from meshtron.data.loader import DataLoader, collate

    num_samples = len(dataset)
    full, partial_round = _pass_plan(num_samples, micro_batch_size, dp_size, whole_rounds)
    loader = iter(DataLoader(dataset, micro_batch_size, dp_rank, dp_size, seed=0, shuffle=False))
    for _ in range(full if full or partial_round else 1):
        yield next(loader)
    if partial_round:
        positions = range(full * micro_batch_size * dp_size + dp_rank, num_samples, dp_size)
        yield collate([dataset[p] for p in positions])


def _find(path: str, config_dir: Path | None) -> Path:
    """`path` as given (relative to the current directory), else relative to the config file's
    directory or one of its parents (so that shipped configs find the repository's data/ from anywhere)."""
    candidates = [Path(path)]
    if config_dir is not None and not Path(path).is_absolute():
        candidates += [parent / path for parent in (config_dir, *config_dir.parents)]
    for candidate in candidates:
        if candidate.exists() or names.kinds_at(str(candidate)):
            return candidate
    return Path(path)


def _resolve_path(path: str, config: JobConfig, data_kind: str, handler: str, tokenizer_dir: Path | None,
                  config_dir: Path | None) -> str:
    found = _find(path, config_dir)
    if found.is_file() and found.suffix in RAW_SUFFIXES:
        return _preprocess_on_the_fly(found, config, data_kind, handler, tokenizer_dir)
    if names.is_complete(str(found), data_kind):
        return str(found)
    other_kinds = names.kinds_at(str(found))
    if other_kinds:
        raise UserError(f"data path {path!r} holds {other_kinds[0]} data, but the {config.train.recipe} recipe "
                        f"trains on {data_kind} data: preprocess it with a {data_kind} handler")
    raise UserError(
        f"data path {path!r} not found: give a prefix written by `meshtron preprocess` (PREFIX of "
        f"PREFIX_{names.datasets(data_kind)[0]}.bin) or a raw {'/'.join(RAW_SUFFIXES)} file"
    )


def _preprocess_on_the_fly(raw: Path, config: JobConfig, data_kind: str, handler: str,
                           tokenizer_dir: Path | None) -> str:
    """Preprocess a raw file into OUTPUT_DIR/data once (rank 0; the others wait), keyed by its inputs."""
    if tokenizer_dir is None:
        raise UserError(f"data path {raw} is a raw file and needs a tokenizer to be preprocessed; set "
                        "model.tokenizer (e.g. \"smollm2\") or preprocess it with `meshtron preprocess`")
    stat = raw.stat()
    skip = config.data.skip_bad_lines
    key = f"{raw.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{handler}|{tokenizer_dir}|{config.train.seq_length}|{skip}"
    digest = hashlib.sha1(key.encode()).hexdigest()[:10]
    prefix = Path(config.train.output_dir) / "data" / f"{raw.stem}-{handler}-{digest}"
    if (not dist.is_initialized() or dist.get_rank() == 0) and not names.is_complete(str(prefix), data_kind):
        from meshtron.data.handlers import HandlerOptions
        from meshtron.data.preprocess import PreprocessConfig, preprocess

        # What `meshtron preprocess` does, in this process: a fresh interpreter would import torch and
        # transformers again (seconds of a core) for a file that tokenizes in a fraction of that. Pairs
        # are padded rows, never packed; SFT samples are packed into rows of seq_length.
        pretrain = data_kind == "pretrain"
        options = HandlerOptions(append_eod=pretrain, seq_length=None if pretrain else config.train.seq_length)
        cfg = PreprocessConfig(inputs=[str(raw)], handler=handler, tokenizer=str(tokenizer_dir),
                               output_prefix=str(prefix), options=options, pack=data_kind == "sft",
                               skip_bad_lines=skip)
        log.info("preprocessing %s with handler %s into %s", raw, handler, prefix)
        try:
            preprocess(cfg)
        except UserError as e:
            raise UserError(f"preprocessing {raw} failed: {e}") from None
        if not names.is_complete(str(prefix), data_kind):
            raise UserError(f"handler {handler!r} does not write the {data_kind} data that the {config.train.recipe} "
                            f"recipe trains on; set data.handler (or data.handlers for {str(raw)!r})")
    if dist.is_initialized():
        dist.barrier()
    return str(prefix)
