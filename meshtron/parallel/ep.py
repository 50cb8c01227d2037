"""Expert parallel: the experts of every MoE layer split over the `ep` mesh axis, tokens sent to the rank
holding their expert with all-to-all and brought back in order (as torchtitan's ExpertParallel).

The ep ranks are data-parallel ranks for the rest of the model (ParallelDims carves `ep` out of
dp_shard x cp), so expert parallel adds no processes: each rank routes its own tokens, holds E / ep of
the experts of each layer (its slice of the stacked weights, a DTensor sharded on the expert dim) and
computes, for every rank of its ep group, the rows routed to those experts.

Rows reach the experts module sorted by (global) expert, `counts[e]` of them for expert e
(`models.common.moe.GroupedExperts`). The hooks placed here turn that into this rank's share:

    dispatch: counts exchanged (all-to-all of E numbers), then the rows (all-to-all, uneven splits);
              they arrive grouped by source rank, then local expert: reordered to local expert, then
              source, the order grouped GEMM needs.
    combine:  the inverse order, then the reverse all-to-all: each row back where it came from.

Both row all-to-alls are the autograd form, so the backward sends gradients the same way back.

Without expert parallel (ep = 1), tensor parallel splits every expert instead, like the dense MLP
(`ExpertTensorParallel`): gate_proj and up_proj column-wise (on I), down_proj row-wise, each rank computing
its part of every row's expert MLP and the partial outputs summed over the tp ranks.
"""

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle

from meshtron.parallel.plan import ParallelPlan


def exchange_rows(x_RD: torch.Tensor, send: list[int], receive: list[int], group) -> torch.Tensor:
    """All-to-all of rows: send[r] rows (in order) to rank r, receive[r] from it; differentiable."""
    return all_to_all_single_autograd(x_RD.contiguous(), receive, send, group)


def local_expert_order(counts_PL: torch.Tensor) -> torch.Tensor:
    """Rows received grouped by (source rank p, local expert l), counts_PL[p, l] of each: the indices that
    regroup them by (l, p), so that each local expert's rows are contiguous."""
    counts = counts_PL.flatten()
    starts = torch.cumsum(counts, 0) - counts  # where each (p, l) chunk begins in the received rows
    chunks = torch.arange(counts.numel(), device=counts.device).view_as(counts_PL).t().flatten()  # (l, p) order
    sizes = counts[chunks]
    chunk_of_row = torch.repeat_interleave(chunks, sizes)
    offset_in_chunk = torch.arange(chunk_of_row.numel(), device=counts.device) - torch.repeat_interleave(
        torch.cumsum(sizes, 0) - sizes, sizes)
    return starts[chunk_of_row] + offset_in_chunk


class ExpertParallel(ParallelStyle):
    """Shards a GroupedExperts module's stacked weights on the expert dim over a 1-D ep mesh and wraps its
    forward in dispatch and combine, which share the splits and order of the forward in flight (per module:
    a recomputed forward runs both again, in the same order)."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        group = device_mesh.get_group()
        ranks = device_mesh.size()
        state = {}

        def partition(name, mod, mesh):
            for pname, param in list(mod.named_parameters(recurse=False)):
                mod.register_parameter(pname, nn.Parameter(distribute_tensor(param, mesh, [Shard(0)]),
                                                           requires_grad=param.requires_grad))

        def dispatch(mod, inputs, mesh):
            x_RD, counts_E = inputs
            counts_E = counts_E.to(torch.int64)
            received_E = torch.empty_like(counts_E)
            dist.all_to_all_single(received_E, counts_E, group=group)  # [p * L + l]: rank p's rows for my l
            received_PL = received_E.view(ranks, -1)
            send = counts_E.view(ranks, -1).sum(1).tolist()
            receive = received_PL.sum(1).tolist()
            order = local_expert_order(received_PL)
            state.update(send=send, receive=receive, order=order)
            rows = exchange_rows(x_RD, send, receive, group)
            return rows[order], received_PL.sum(0)

        def combine(mod, out_RD, mesh):
            back = torch.empty_like(state["order"])
            back[state["order"]] = torch.arange(back.numel(), device=back.device)
            return exchange_rows(out_RD[back], state["receive"], state["send"], group)

        return distribute_module(module, device_mesh, partition, dispatch, combine)


class ExpertTensorParallel(ParallelStyle):
    """Shards a GroupedExperts module's stacked weights over a 1-D tp mesh as Megatron splits an MLP: gate_proj
    and up_proj (E, I, D) on I, down_proj (E, D, I) on I. Every tp rank gets all the rows (the router runs
    replicated); the input's gradient, partial on each rank, is summed over the ranks in the backward, and
    the partial outputs in the forward."""

    SHARD_DIMS = {"gate_proj": 1, "up_proj": 1, "down_proj": 2}

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def partition(name, mod, mesh):
            for pname, param in list(mod.named_parameters(recurse=False)):
                placement = [Shard(self.SHARD_DIMS[pname])]
                mod.register_parameter(pname, nn.Parameter(distribute_tensor(param, mesh, placement),
                                                           requires_grad=param.requires_grad))

        def replicated_rows(mod, inputs, mesh):
            x_RD, counts_E = inputs
            x_RD = DTensor.from_local(x_RD, mesh, [Replicate()], run_check=False).to_local(grad_placements=[Partial()])
            return x_RD, counts_E

        def summed_output(mod, out_RD, mesh):
            return DTensor.from_local(out_RD, mesh, [Partial()], run_check=False).redistribute(
                mesh, [Replicate()]).to_local()

        return distribute_module(module, device_mesh, partition, replicated_rows, summed_output)


def apply_ep(model: nn.Module, plan: ParallelPlan, ep_mesh: DeviceMesh) -> None:
    """Split the experts of every MoE block the model holds over `ep_mesh` (on the meta device, in place)."""
    for experts in plan.experts_of(model):
        ExpertParallel()._apply(experts, ep_mesh)


def apply_expert_tp(model: nn.Module, plan: ParallelPlan, tp_mesh: DeviceMesh) -> None:
    """Split every expert of every MoE block the model holds over `tp_mesh` (without expert parallel)."""
    for experts in plan.experts_of(model):
        ExpertTensorParallel()._apply(experts, tp_mesh)
