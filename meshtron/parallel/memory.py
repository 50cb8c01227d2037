"""Memory per rank of a training run, computed from the model's shapes and the parallel layout.

What each rank holds (AdamW, FSDP2 over dp_shard, tensor parallel with sequence parallel over tp,
pipeline stages over pp, 1F1B schedule):

- params, grads, optimizer: the master-dtype parameters, their gradients and AdamW's two moments,
  each sharded over dp_shard x tp and split over pp (replicas under HSDP hold a full shard each);
- gathered: FSDP's transient full copies of the largest unit (a block, or the embedding and head; an
  untied embedding and head are units of their own now, so this overestimates them by one matrix):
  its parameters in the compute dtype, twice (one prefetched), and its unsharded gradient. Under
  pp, torch's pipeline schedule keeps the whole stage unsharded from the first micro-batch's
  backward to the last (it turns off resharding after backward and the gradient reduction until
  then), so there it is the stage's parameters in the compute dtype and their unsharded
  gradients in the master dtype;
- activations: what backward keeps per layer and token (measured on CPU by torch's MemTracker:
  6 x dim + 2 x (q + kv widths) + 4 x ffn_dim + heads values, and 3.5 x dim outside the layers),
  for the micro-batches a stage holds in flight (pp of them under 1F1B), split over tp by
  sequence parallel; full recompute keeps only each layer's input, selective drops the attention
  core's log-sum-exp (the attention itself keeps no score matrix: flash / memory-efficient kernels);
  op keeps the layer's input and the outputs of the ops it saves (meshtron.parallel.recompute
  SAVED_OPS): q, k and v projections (q + 2 x kv), the attention's output and log-sum-exp (q + heads),
  o_proj (dim), gate and up projections (2 x ffn_dim) and down projection (dim), so
  3 x dim + 2 x (q + kv) + 2 x ffn_dim + heads values;
- recomputed: one layer's activations while backward recomputes it: under full recompute the whole
  layer's; under op what the layer keeps without recompute less what op kept (torch's selective
  checkpoint hands its saved outputs to the recomputed layer and drops them from its cache);
- logits: at tp = pp = 1 the head and the loss run chunk by chunk (meshtron.train.losses.chunked_head_nll,
  CHUNK_ELEMENTS logits a chunk) and backward keeps none of them, only the final hidden states
  (counted above) from which it recomputes each chunk: one chunk's logits and their log-softmax are
  live at a time, both float32 (plus the logits in the compute dtype below float32); in a chunk's
  backward, the log-softmax and its gradient, as many. At tp > 1 (vocabulary-sharded under
  loss_parallel) and on pp's last stage (the schedule's loss takes the stage's logits) the
  micro-batch's logits are held: in the compute dtype and (below float32) their float32 copy.
  A LoRA-wrapped head runs unchunked (not modelled).

Not counted: the CUDA context and allocator fragmentation (add a few GB), communication buffers
beyond the gathered unit, the head weight's gradient being summed over the loss's chunks (one more
head-sized tensor in the head's backward) and frozen reference models (DPO).
"""

from dataclasses import dataclass

from meshtron.config.loader import RECOMPUTE_MODES as RECOMPUTE
from meshtron.models.common.args import ModelArgs
from meshtron.train import losses

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
PARTS = ("params", "grads", "optimizer", "gathered", "activations", "recomputed", "logits")
OUTSIDE_LAYERS = 3.5  # values per token per dim kept outside the layers (measured, see the module docstring)


@dataclass(frozen=True)
class Layout:
    dp_shard: int = 1
    dp_replicate: int = 1
    tp: int = 1
    pp: int = 1
    micro_batch_size: int = 1
    seq_length: int = 2048
    recompute: str = "none"
    compute_dtype: str = "bfloat16"
    master_dtype: str = "float32"

    def __post_init__(self):
        if self.recompute not in RECOMPUTE:
            raise ValueError(f"recompute {self.recompute!r}: choose one of {', '.join(RECOMPUTE)}")
        for dtype in (self.compute_dtype, self.master_dtype):
            if dtype not in DTYPE_BYTES:
                raise ValueError(f"dtype {dtype!r}: choose one of {', '.join(DTYPE_BYTES)}")


def activation_values_per_token(args: ModelArgs, recompute: str) -> float:
    """Values one layer keeps for backward per token (see the module docstring)."""
    q, kv = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
    whole = 6 * args.dim + 2 * (q + kv) + 4 * args.ffn_dim + args.num_heads
    if recompute == "full":
        return args.dim  # the layer's input
    if recompute == "selective":
        return whole - args.num_heads  # the attention core's log-sum-exp (its output is o_proj's input)
    if recompute == "op":
        return 3 * args.dim + 2 * (q + kv) + 2 * args.ffn_dim + args.num_heads
    return whole


def logits_bytes(args: ModelArgs, layout: Layout) -> float:
    """The head's output and loss at their peak (see the module docstring)."""
    compute = DTYPE_BYTES[layout.compute_dtype]
    below_float32 = compute if compute != 4 else 0
    tokens = layout.micro_batch_size * layout.seq_length
    if layout.tp == layout.pp == 1:  # chunked_head_nll: one chunk's tokens at a time
        chunk = min(tokens, max(1, losses.CHUNK_ELEMENTS // args.vocab_size))
        return chunk * args.vocab_size * (2 * 4 + below_float32)
    return tokens * args.vocab_size / layout.tp * (compute + (4 if below_float32 else 0))


def memory_per_rank(args: ModelArgs, layout: Layout) -> dict[str, float]:
    """Bytes per rank by part (PARTS) and their "total"."""
    master, compute = DTYPE_BYTES[layout.master_dtype], DTYPE_BYTES[layout.compute_dtype]
    params = args.num_params()
    shard = params / (layout.dp_shard * layout.tp * layout.pp)
    q, kv = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
    block = args.dim * (2 * q + 2 * kv) + 3 * args.dim * args.ffn_dim
    root = args.vocab_size * args.dim * (1 if args.tie_embeddings else 2)
    data_parallel = layout.dp_shard * layout.dp_replicate > 1
    unit = max(block, root) / layout.tp if data_parallel else 0
    gathered = unit * (2 * compute + master)
    if layout.pp > 1 and data_parallel:
        gathered = params / (layout.tp * layout.pp) * (compute + master)
    tokens = layout.micro_batch_size * layout.seq_length
    layers_held = args.num_layers / layout.pp * layout.pp  # a stage's layers x micro-batches in flight (1F1B)
    per_layer = activation_values_per_token(args, layout.recompute) * tokens * compute / layout.tp
    # Outside the layers: the embedding's output and the final norm's input and output.
    activations = layers_held * per_layer + OUTSIDE_LAYERS * args.dim * tokens * compute / layout.tp
    recomputed = 0.0
    if layout.recompute in ("full", "op"):  # one layer whole while backward recomputes it, less what op kept
        kept = activation_values_per_token(args, "op") if layout.recompute == "op" else 0
        recomputed = (activation_values_per_token(args, "none") - kept) * tokens * compute / layout.tp
    parts = {
        "params": shard * master,
        "grads": shard * master,
        "optimizer": 2 * shard * master,
        "gathered": gathered,
        "activations": activations,
        "recomputed": recomputed,
        "logits": logits_bytes(args, layout),
    }
    parts["total"] = sum(parts.values())
    return parts
