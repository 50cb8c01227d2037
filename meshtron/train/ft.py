"""Replica fault tolerance with torchft (the optional extra `meshtron[ft]`).

Under [ft], this job is one replica group: its own ranks (FSDP, TP, ... inside it) and its own
torchrun. Several such jobs train one model together: each step, torchft's Manager forms a quorum
of the replica groups alive (through a lighthouse server), averages the gradients over them and
lets the optimizer step only when that succeeded everywhere. A replica group that dies drops out
of the next quorum and the others train on; one that starts (a replacement, or the restarted one)
joins the next quorum and first heals: it receives the whole training state (model, optimizer, lr
schedule, data position, step) from a live peer.

Each replica group reads its own share of the data (data-parallel rank and size are widened by
the replica groups). The loss of a step is normalized within each replica group, and gradients
are averaged over the groups in the quorum.
"""

import logging
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from meshtron.config.job import FTConfig
from meshtron.errors import UserError

log = logging.getLogger(__name__)


class ReplicaGroupFT:
    """torchft's Manager around a trainer's states (the Stateful objects a checkpoint holds)."""

    def __init__(self, config: FTConfig, states: dict, device: torch.device):
        try:
            from torchft import Manager, ProcessGroupGloo, ProcessGroupNCCL
        except ImportError:
            raise UserError("ft.enable needs torchft: pip install 'meshtron[ft]'") from None
        self.states = states
        timeout = timedelta(seconds=config.timeout_s)
        pg = ProcessGroupNCCL(timeout=timeout) if device.type == "cuda" else ProcessGroupGloo(timeout=timeout)
        self.manager = Manager(
            pg=pg, min_replica_size=config.min_replicas, load_state_dict=self._load, state_dict=self._state,
            replica_id=f"meshtron_{config.replica_group}", lighthouse_addr=config.lighthouse or None,
            rank=dist.get_rank(), world_size=dist.get_world_size(), timeout=timeout,
            # Heal before the step's forward, so that a joining group computes on the peers' weights.
            use_async_quorum=False,
        )

    def _state(self) -> dict:
        return {name: state.state_dict() for name, state in self.states.items()}

    def _load(self, state_dict: dict) -> None:
        for name, state in self.states.items():
            state.load_state_dict(state_dict[name])
        log.info("healed from a live replica group: now at step %d", state_dict["train_state"]["step"])

    def step_begins(self) -> None:
        """Join this step's quorum; a group that is behind (new, restarted) heals here."""
        self.manager.start_quorum()

    def average_gradients(self, params) -> bool:
        """Average the gradients over the replica groups of the quorum; whether the optimizer may step
        (False when a peer failed during the step: the step is then dropped and repeated)."""
        works = [self.manager.allreduce(p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad)
                 for p in params if p.grad is not None]
        for work in works:
            work.wait()
        return self.manager.should_commit()

    def shutdown(self) -> None:
        self.manager.shutdown(wait=False)
