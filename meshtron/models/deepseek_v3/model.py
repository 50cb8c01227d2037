"""The DeepSeek decoder: pre-norm blocks of multi-head latent attention, the first layers with a dense
MLP and the others with an MoE layer (routed experts plus an ungated shared expert), and optionally
DeepSeek-V3's multi-token prediction (MTP) modules.

MTP module k (k = 1..num_mtp_layers, held as `mtp[num_layers + k - 1]`, the layer index of DeepSeek's
checkpoints) predicts the token k + 1 places ahead: it normalizes the previous depth's hidden states
(`hnorm`; depth 0 is the main model's output after its final norm) and the embedding of the token k places
ahead (`enorm`), projects their concatenation [embedding, hidden] back to the model width (`eh_proj`), runs
a decoder block and the shared output head after its own norm (`head_norm`, the checkpoint's
`shared_head.norm`). The embedding and the head are the main model's. MTP runs only where a training loss
asks for it (`mtp_labels`); generation and evaluation never run it.
"""

import torch
from torch import nn

from meshtron.models.common.attention import residual_std
from meshtron.models.common.init import ParamInit
from meshtron.models.common.layers import RMSNorm
from meshtron.models.common.mla import LatentAttention
from meshtron.models.common.moe import MoE, MoETransformer
from meshtron.models.common.transformer import TransformerBlock
from meshtron.models.deepseek_v3.args import DeepSeekArgs
from meshtron.train.losses import IGNORE_INDEX, head_cross_entropy_sum


class MTPLayer(TransformerBlock):
    """One multi-token prediction module: a DeepSeek block with its input combination and output norm."""

    def __init__(self, args: DeepSeekArgs, layer_id: int, mlp: nn.Module | None):
        super().__init__(args, layer_id, mlp=mlp, attn=LatentAttention(args, layer_id))
        self.enorm = RMSNorm(args.dim, args.norm_eps)
        self.hnorm = RMSNorm(args.dim, args.norm_eps)
        self.eh_proj = nn.Linear(2 * args.dim, args.dim, bias=False)
        self.head_norm = RMSNorm(args.dim, args.norm_eps)
        self.std = args.init_std

    def init_weights(self, init: ParamInit) -> None:
        init.linear(self.eh_proj, "eh_proj", self.std)

    def forward(self, h_BSE, embedded_BSE, cos, sin, mask, cache=None):
        x = self.eh_proj(torch.cat([self.enorm(embedded_BSE), self.hnorm(h_BSE)], dim=-1))
        return super().forward(x, cos, sin, mask)


def labels_ahead(labels_BS: torch.Tensor, k: int, document_ids: torch.Tensor | None) -> torch.Tensor:
    """The labels `k` positions further on (the token k + 1 ahead of each position), ignored where that
    position is past the sequence's end or in another document."""
    ahead = torch.full_like(labels_BS, IGNORE_INDEX)
    ahead[:, :-k] = labels_BS[:, k:]
    if document_ids is not None:
        ahead[:, :-k].masked_fill_(document_ids[:, k:] != document_ids[:, :-k], IGNORE_INDEX)
    return ahead


class DeepSeekTransformer(MoETransformer):
    def __init__(self, args: DeepSeekArgs):
        super().__init__(args)
        first = args.num_layers
        self.mtp = nn.ModuleDict({str(i): MTPLayer(args, i, self.make_mlp(args, i))
                                  for i in range(first, first + args.num_mtp_layers)})
        self.mtp_loss_sums: list[torch.Tensor] | None = None

    def make_mlp(self, args: DeepSeekArgs, layer_id: int) -> nn.Module | None:
        return MoE(args, out_std=residual_std(args)) if args.is_moe_layer(layer_id) else None

    def make_block(self, args: DeepSeekArgs, layer_id: int) -> nn.Module:
        return TransformerBlock(args, layer_id, mlp=self.make_mlp(args, layer_id),
                                attn=LatentAttention(args, layer_id))

    def forward(self, tokens, position_ids=None, document_ids=None, cache=None, num_last=None, head=None,
                mask=None, mtp_labels=None):
        """The decoder's forward (`Transformer.forward`). With `mtp_labels` (the main loss's (B, S) labels)
        and MTP modules, also runs them and keeps each depth's summed cross-entropy in `mtp_loss_sums`
        (`take_mtp_loss_sums`), computed inside this forward so that FSDP gathers the shared head."""
        if mtp_labels is None or not self.mtp:
            return super().forward(tokens, position_ids, document_ids, cache, num_last, head, mask)
        if head is None or position_ids is None or mask is None:
            raise ValueError("multi-token prediction trains with the loss head, the position ids and the mask of "
                             "the batch")

        def main_and_mtp_heads(h_BSE, lm_head):
            self.mtp_loss_sums = self._mtp_loss_sums(h_BSE, tokens, position_ids, mask, mtp_labels, lm_head)
            return head(h_BSE, lm_head)

        return super().forward(tokens, position_ids, cache=cache, head=main_and_mtp_heads, mask=mask)

    def _mtp_loss_sums(self, h_BSE, tokens, position_ids, mask, labels_BS, lm_head) -> list[torch.Tensor]:
        cos, sin = self.rope(position_ids, h_BSE.dtype)
        sums = []
        for k, layer in enumerate(self.mtp.values(), start=1):
            # The last k positions embed a wrapped-around token; their labels are ignored.
            h_BSE = layer(h_BSE, self.embed(tokens.roll(-k, dims=1)), cos, sin, mask)
            target = labels_ahead(labels_BS, k, mask.document_ids)
            sums.append(head_cross_entropy_sum(layer.head_norm(h_BSE), lm_head, target))
        return sums


def take_mtp_loss_sums(model: nn.Module) -> list[torch.Tensor] | None:
    """Each MTP depth's summed cross-entropy of the model's last forward with `mtp_labels`, then forgotten
    (None: no MTP ran)."""
    sums = getattr(model, "mtp_loss_sums", None)
    if sums is not None:
        model.mtp_loss_sums = None
    return sums
