"""Data parallelism for lthfast: the process group, rank roles, agreement checks, and the refusal of sharded models.

``World`` describes this process's place in a ``torch.distributed`` job started by ``torchrun`` (which sets RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT) or by a caller that initialized the process group itself.
A single process is a World of size 1, and every method then does nothing or runs locally, so callers need no
``if distributed`` branches.

Errors never leave ranks hanging: work done on rank 0 alone (``on_main``) and checks that may fail on any rank
(``agree``) are collective, and raise on every rank when any rank failed.

FSDP is refused (``refuse_sharded``): magnitude pruning ranks every weight of the model against one global threshold,
and masks, the optimizer guard and checkpoints are whole tensors shaped like the weights. A sharded model (FSDP1
flat parameters, FSDP2 DTensor parameters) has none of that on any rank, so pruning it would silently rank each
rank's shard on its own. Use DDP, which replicates the model (lthfast's models fit on one device).
"""

from __future__ import annotations

import atexit
import hashlib
import os
import pickle
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")


class DistributedError(RuntimeError):
    """Ranks disagree (masks differ, a rank cannot see the run directory) or a sharded model was given."""


@dataclass
class World:
    """This process's rank among ``size`` processes (``size == 1``: not distributed) and its device."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1

    # ---- collectives (no-ops for a single process) ------------------------------------------------------
    def barrier(self) -> None:
        if self.active:  # NCCL is told the device, or it guesses one and warns
            dist.barrier(device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def all_reduce_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the ranks, in place (on the process group's device), and return it."""
        if self.active:
            dist.all_reduce(tensor)
        return tensor

    def all_gather(self, obj: T) -> list[T]:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if not self.active:
            return [obj]
        out: list = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def agree(self, error: BaseException | None) -> None:
        """Collective: raise on every rank when any rank passes an error (the first failing rank's, named)."""
        if not self.active:
            if error is not None:
                raise error
            return
        errors = self.all_gather(None if error is None else (type(error).__name__, str(error), _portable(error)))
        for rank, entry in enumerate(errors):
            if entry is None:
                continue
            if rank == self.rank:
                raise error
            name, message, exc = entry
            if isinstance(exc, Exception):  # the same type (ImpError, DataError, ...) on every rank
                raise exc
            raise DistributedError(f"rank {rank} failed: {name}: {message}")

    def on_main(self, fn: Callable[[], T]) -> T:
        """Collective: run ``fn`` on rank 0 only and return its result on every rank (pickled to the others).

        An exception on rank 0 is raised on every rank. The call orders the ranks both ways: rank 0 starts ``fn``
        only when every rank has reached the call, so whatever the ranks read before it (does a file exist?) they
        read before rank 0 writes; and no rank returns before rank 0 has finished ``fn`` (e.g. written a file the
        others read next). (Without the first barrier, a slower rank saw rank 0's new rewind.pt, skipped the call
        that wrote it, and both ranks waited for each other.)
        """
        self.barrier()
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except Exception as exc:  # noqa: BLE001 - re-raised on every rank by agree()
                error = exc
        self.agree(error)
        if not self.active:
            return result
        box = [result]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def check_same(self, tensors: Mapping[str, torch.Tensor], what: str) -> str | None:
        """Collective: the SHA-256 of ``tensors`` (names, shapes, dtypes, bytes) must be equal on every rank.

        Raises DistributedError on every rank otherwise, naming the ranks that differ from rank 0. Returns the
        hex digest (None for a single process, which has nothing to compare). Cost: one host copy and hash of the
        tensors (masks are bool: 1 byte per weight).
        """
        if not self.active:
            return None
        digest = checksum(tensors)
        digests = self.all_gather(digest)
        differ = [r for r, d in enumerate(digests) if d != digests[0]]
        if differ:
            raise DistributedError(
                f"{what} differ across ranks: ranks {differ} hold other bytes than rank 0 "
                f"(sha256 {', '.join(f'rank {r}: {d[:12]}' for r, d in enumerate(digests))}); "
                "every rank must prune the same weights with the same seeds"
            )
        return digest


def _portable(exc: BaseException) -> BaseException | None:
    """``exc`` when it survives pickling (so other ranks can raise the same type), else None."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:  # noqa: BLE001 - any exception type may refuse to pickle
        return None
    return exc


def checksum(tensors: Mapping[str, torch.Tensor]) -> str:
    """Hex SHA-256 over the sorted names, shapes, dtypes and bytes of ``tensors``."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def env_world_size() -> int:
    """WORLD_SIZE as set by torchrun (1 when unset), or the initialized process group's size."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def backend_name() -> str:
    """The process group's backend ("gloo", "nccl"), or "none" for a single process."""
    return str(dist.get_backend()) if dist.is_available() and dist.is_initialized() else "none"


def setup(device: torch.device) -> World:
    """The World of this process, initializing the process group when torchrun started several processes.

    device: where this job trains ("cpu" or "cuda"); under CUDA each rank takes ``cuda:LOCAL_RANK``. The
    backend is NCCL for CUDA and gloo for CPU. A process group the caller initialized is used as it is. One that
    this function initializes lives until the process exits (then it is destroyed), so later calls reuse it:
    destroying and re-creating it under torchrun hung at the first collective about one time in two (the new
    group met the previous one's rendezvous keys, left in torchrun's store).
    """
    size = env_world_size()
    if size <= 1:
        return World(device=device)
    if not dist.is_available():
        raise DistributedError(f"WORLD_SIZE={size} but this torch build has no torch.distributed")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise DistributedError(
                f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} CUDA devices: start at most "
                "that many processes per node (torchrun --nproc-per-node)"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(_destroy)
    elif dist.get_backend() == "nccl" and device.type != "cuda":
        raise DistributedError("the process group uses NCCL, which needs CUDA tensors: use --device cuda or gloo")
    return World(rank=dist.get_rank(), size=dist.get_world_size(), local_rank=local_rank, device=device)


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _sharding_of(model: nn.Module) -> str | None:
    """What shards ``model`` ("FSDP", "FSDP2 (fully_shard)", "DTensor parameters"), or None."""
    from torch.distributed import fsdp

    fsdp2 = getattr(fsdp, "FSDPModule", None)
    for module in model.modules():
        if isinstance(module, fsdp.FullyShardedDataParallel):
            return "FSDP (FullyShardedDataParallel)"
        if fsdp2 is not None and isinstance(module, fsdp2):
            return "FSDP2 (fully_shard)"
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - every supported torch has it
        return None
    if any(isinstance(p, DTensor) for p in model.parameters()):
        return "DTensor (sharded) parameters"
    return None


def refuse_sharded(model: nn.Module, where: str) -> None:
    """Raise DistributedError when ``model`` is sharded (FSDP, FSDP2, DTensor parameters): see the module doc."""
    if not dist.is_available() or not isinstance(model, nn.Module):
        return
    sharding = _sharding_of(model)
    if sharding is not None:
        raise DistributedError(
            f"{where}: the model is sharded with {sharding}, which lthfast does not support: global magnitude "
            "pruning, masks and checkpoints need whole weights on every rank. Pass the unwrapped model and use "
            "data parallelism instead: torchrun --nproc-per-node N -m lthfast imp ... (DDP, one replica per rank)"
        )
