"""Perplexity (validation loss) of a model on an indexed dataset (`meshtron preprocess` output).

Each document is cut into non-overlapping windows of `seq_length` predicted tokens; every
token after a window's first is predicted once, and the result is exp(total NLL / tokens).
Documents are dealt round-robin to data-parallel ranks and the sums all-reduced.
"""

from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from meshtron.errors import UserError
from meshtron.eval.lm import EvalLM

METHOD = "exp(mean next-token NLL) over non-overlapping windows of each document"


def resolve_prefix(path: str) -> str:
    from meshtron.data.indexed import exists

    for prefix in (path, f"{path}_text_document"):
        if exists(prefix):
            return prefix
    raise UserError(f"perplexity: no indexed dataset at {path} (expected PREFIX.bin/.idx or "
                    f"PREFIX_text_document.bin/.idx from `meshtron preprocess --handler pretrain`)")


@torch.no_grad()
def perplexity(lm: EvalLM, path: str, seq_length: int, limit: int | None, layout=None):
    from meshtron.data.indexed import IndexedDataset
    from meshtron.eval.harness import Layout
    from meshtron.eval.results import TaskResult

    layout = layout or Layout()

    ds = IndexedDataset(resolve_prefix(path))
    num_docs = ds.num_documents if limit is None else min(limit, ds.num_documents)
    nll = torch.zeros((), dtype=torch.float64)
    count = torch.zeros((), dtype=torch.float64)
    for doc in range(layout.dp_rank, num_docs, layout.dp_size):
        tokens = torch.from_numpy(ds.document(doc).astype("int64"))
        for start in range(0, max(len(tokens) - 1, 0), seq_length):
            window = tokens[start : start + seq_length + 1].to(lm.device)
            if len(window) < 2:
                break
            logits = lm.logits(window[None, :-1]).float()
            nll += F.cross_entropy(logits[0], window[1:], reduction="sum").double().cpu()
            count += len(window) - 1
    if layout.dp_size > 1:
        stats = torch.stack([nll, count]).to(lm.device)
        dist.all_reduce(stats, group=layout.dp_group)
        nll, count = stats[0], stats[1]
    if count == 0:
        raise UserError(f"perplexity: {path} holds no tokens to predict")
    mean = (nll / count).item()
    return TaskResult("perplexity", "perplexity", float(torch.exp(torch.tensor(mean))), num_docs, 0,
                      "loglikelihood", METHOD, {}, {"nll_per_token": mean, "tokens": int(count.item()),
                                                    "dataset": str(Path(path))})
