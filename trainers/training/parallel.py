"""Data-parallel training over several processes (``accelerate launch`` / ``torchrun``).

One process per device trains the same model on its own shard of every batch; gradients are
averaged over the processes before the optimizer step, so every process holds the same weights.
The engine's loop stays what it is on one process:

- Every process draws the *global* batch from the run's one data generator (image order, flips,
  latent samples, noise, timesteps: the same numbers as one process training on the whole batch)
  and computes only its shard of it. A run is therefore reproducible for any process count, and
  1 process x batch 4, 2 processes x batch 2 and 1 process x batch 2 x 2 accumulation steps are
  the same training up to the order of float sums. The global batch (``batch_size`` x processes
  x ``gradient_accumulation``) is what a run's identity holds.
- Only the main process (rank 0) writes anything: files, step files, training states, samples,
  class images, progress. The others wait where they need what it wrote (class images) and
  otherwise meet it at the gradient average of every step.
- A process that fails or is killed ends the launch: the launcher stops the others, and nothing
  is written that was not complete before (save points stay resumable, by any process count).

The launcher sets ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``;
:func:`current` joins the process group from them (NCCL on CUDA, gloo on the CPU).
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

# Elements per all-reduce call when averaging gradients (a 100 MB fp32 bucket).
BUCKET_ELEMENTS = 25_000_000
# How long a process waits for the others at a collective call: the main process may be
# writing a checkpoint or generating class images meanwhile.
TIMEOUT = datetime.timedelta(hours=2)


@dataclass(frozen=True)
class Processes:
    """This process's place among the processes training one run (one process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    # the optimizer states split over the processes (ZeRO stage 1): see loop.make_optimizer
    shard_optimizer: bool = False
    # and the gradients too (ZeRO stage 2): see GradientShards
    shard_gradients: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def several(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.several:
            torch.distributed.barrier()

    def average_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Replace each tensor by its mean over the processes, in place (flattened in buckets)."""
        if not self.several:
            return
        for bucket in _buckets(tensors):
            if len(bucket) == 1:
                torch.distributed.all_reduce(bucket[0])
                bucket[0].div_(self.world)
                continue
            flat = torch.cat([t.reshape(-1) for t in bucket])
            torch.distributed.all_reduce(flat)
            flat.div_(self.world)
            offset = 0
            for tensor in bucket:
                count = tensor.numel()
                tensor.copy_(flat[offset : offset + count].view_as(tensor))
                offset += count

    def average_gradients(self, parameters: Iterable[torch.Tensor]) -> None:
        """Average the gradients of ``parameters`` over the processes (all must have one)."""
        if self.several:
            self.average_([p.grad for p in parameters if p.grad is not None])

    def mean(self, values: Sequence[float]) -> list[float]:
        """The mean of each value over the processes (a small all-reduce)."""
        if not self.several:
            return list(values)
        tensor = torch.tensor(list(values), dtype=torch.float64, device=_collective_device())
        torch.distributed.all_reduce(tensor)
        return (tensor / self.world).tolist()

    def from_main(self, value: object) -> object:
        """The main process's ``value``, in every process (others pass anything, e.g. None)."""
        if not self.several:
            return value
        box = [value if self.main else None]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def shard(self, global_batch: int, accumulation: int) -> list[range]:
        """The rows of a global batch this process computes, one range per accumulation step."""
        per = global_batch // (self.world * accumulation)
        return [range((self.rank * accumulation + m) * per, (self.rank * accumulation + m + 1) * per)
                for m in range(accumulation)]


SINGLE = Processes()
_CURRENT: Processes | None = None


class GradientShards:
    """ZeRO stage 2: each process keeps the gradients of only its share of the weights (the share
    whose optimizer states it holds and which it steps; ``owner`` maps each weight to its process).

    A hook on every weight sends its gradient to its owner as soon as the backward pass has
    accumulated it (a sum over the processes) and frees it everywhere else, so a process never
    holds more than its own share plus the one gradient in flight: the UNet's 3.4 GB of fp32
    gradients become 3.4 / N GB. With gradient accumulation the owner keeps adding: its gradient
    holds the sum so far plus its own new part, the others' new parts arrive with the next
    reduction. :meth:`finish` makes the mean, the norm over all shares and the clipping, which
    is what averaging every gradient everywhere and ``clip_grad_norm_`` give, in float rounding.
    """

    def __init__(self, parameters: Sequence[torch.Tensor], owner: dict[torch.Tensor, int], processes: Processes) -> None:
        self.processes = processes
        self.owned = [p for p in parameters if owner[p] == processes.rank]
        self._owner = {id(p): owner[p] for p in parameters}
        # hooks run in the same order in every process: the reductions pair up
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_gradient) for p in parameters]

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def _on_gradient(self, parameter: torch.Tensor) -> None:
        owner = self._owner[id(parameter)]
        assert parameter.grad is not None
        torch.distributed.reduce(parameter.grad, dst=owner)
        if owner != self.processes.rank:
            parameter.grad = None

    def finish(self, max_norm: float) -> float:
        """After the backward pass(es): this process's gradients become the mean over the
        processes, clipped to ``max_norm`` (inf: not clipped) by the norm of all of them, which
        is returned (before clipping; the same in every process)."""
        grads = [p.grad for p in self.owned if p.grad is not None]
        squares = torch.zeros((), dtype=torch.float64, device=_collective_device())
        with torch.no_grad():
            for grad in grads:
                grad.div_(self.processes.world)
                squares += torch.linalg.vector_norm(grad, dtype=torch.float32).double().square().to(squares.device)
            torch.distributed.all_reduce(squares)
            norm = float(squares.sqrt())
            scale = max_norm / (norm + 1e-6)
            if scale < 1.0:  # what clip_grad_norm_ does (a non-finite norm is the caller's to refuse)
                for grad in grads:
                    grad.mul_(scale)
        return norm


def _collective_device() -> torch.device:
    backend = torch.distributed.get_backend()
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def _buckets(tensors: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
    buckets: list[list[torch.Tensor]] = []
    size = 0
    for tensor in tensors:
        if buckets and size + tensor.numel() <= BUCKET_ELEMENTS and buckets[-1][0].dtype == tensor.dtype \
                and buckets[-1][0].device == tensor.device:
            buckets[-1].append(tensor)
            size += tensor.numel()
        else:
            buckets.append([tensor])
            size = tensor.numel()
    return buckets


# Accelerate plugins that would take over the model and optimizer: the engine does not use them
UNSUPPORTED_PLUGINS = {"ACCELERATE_USE_DEEPSPEED": "--use_deepspeed (DeepSpeed)", "ACCELERATE_USE_FSDP": "--use_fsdp (FSDP)",
                       "ACCELERATE_USE_MEGATRON_LM": "--use_megatron_lm (Megatron-LM)"}


def _flag(variable: str) -> bool:
    """Whether the launcher set ``variable`` on (Accelerate writes "true"/"True", some "1")."""
    return os.environ.get(variable, "").lower() in ("1", "true")


def uses_gpus() -> bool:
    """Whether this launch trains on GPUs: CUDA is there and Accelerate was not told --cpu."""
    return torch.cuda.is_available() and not _flag("ACCELERATE_USE_CPU")


def unsupported_plugin() -> str | None:
    """The Accelerate plugin this launch asked for that the engine does not run (None: none)."""
    return next((name for variable, name in UNSUPPORTED_PLUGINS.items() if _flag(variable)), None)


def launched_world() -> int:
    """How many processes the launcher started (1 when not launched by one)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def current() -> Processes:
    """The processes of this run: joins the launcher's process group the first time (several
    processes), or one process."""
    global _CURRENT
    if _CURRENT is not None:
        return _CURRENT
    world = launched_world()
    if world == 1:
        _CURRENT = SINGLE
        return _CURRENT
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not torch.distributed.is_initialized():
        cuda = uses_gpus()
        if cuda:
            torch.cuda.set_device(local_rank)
        torch.distributed.init_process_group(backend="nccl" if cuda else "gloo", timeout=TIMEOUT)
    _CURRENT = Processes(rank=rank, world=world, local_rank=local_rank)
    logger.info("process %d of %d", rank, world)
    return _CURRENT


def shard_optimizer_states(on: bool, gradients: bool = False) -> Processes:
    """Ask for the optimizer states (ZeRO stage 1), and with ``gradients`` the gradients too
    (stage 2), to be split over the processes of this launch (no effect on one process);
    returns the processes."""
    global _CURRENT
    _CURRENT = dataclasses.replace(current(), shard_optimizer=bool(on or gradients), shard_gradients=bool(gradients))
    return _CURRENT


def device_of(processes: Processes, requested: str) -> torch.device:
    """The device this process trains on: ``auto`` is its own GPU (``cuda:<local rank>``) when the
    launch uses GPUs, else the CPU; ``cuda`` means this process's GPU too."""
    if requested == "auto":
        requested = "cuda" if uses_gpus() else "cpu"
    device = torch.device(requested)
    if device.type == "cuda" and device.index is None and processes.several:
        device = torch.device("cuda", processes.local_rank)
    return device


def close() -> None:
    """Leave the process group (at the end of a launched command)."""
    global _CURRENT
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    _CURRENT = None
