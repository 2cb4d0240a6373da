"""torchrun / DistributedDataParallel glue: who am I, which device, which slice of the batch, and
what to say when another rank stops answering."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from .config import DIST_TIMEOUT_MINUTES

__all__ = ["DistInfo", "RankTimeout", "resolve_device", "setup", "teardown", "barrier", "all_reduce_mean",
           "timeout_error"]

# After a timeout, how long the check for missing ranks waits at most: the live ranks time out
# within about a step of each other, since each waits in the same collective.
MISSING_RANK_CHECK = timedelta(minutes=1)
# How the backends word a collective that waited past the timeout (Gloo: "Timed out waiting
# 600000ms for recv operation to complete"; NCCL's watchdog: "collective operation timeout").
_TIMED_OUT = re.compile(r"timed out|timeout", re.IGNORECASE)


class RankTimeout(TimeoutError):
    """A collective operation waited past the process group's timeout: a rank is stopped, hung or
    dead. (A ``TimeoutError``, so the command line says it in one line, exit status 1.)"""


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    timeout_minutes: float = DIST_TIMEOUT_MINUTES
    # a Gloo group of its own, used only to find the missing ranks after a timeout: by then the
    # main group's connections are closed
    monitor: object = field(default=None, compare=False, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def shard(self, n: int) -> slice:
        """This rank's contiguous slice of a global batch of ``n`` (n must divide evenly)."""
        if n % self.world_size:
            raise ValueError(f"global batch {n} is not divisible by world size {self.world_size}")
        per = n // self.world_size
        return slice(self.rank * per, (self.rank + 1) * per)


def resolve_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    if device == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; expected auto, cpu, cuda, cuda:N or mps") from None
    if dev.type not in ("cpu", "cuda", "mps"):  # meta holds no values; others are not supported
        raise ValueError(f"device {device!r} is not supported; expected auto, cpu, cuda, cuda:N or mps")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' was asked for but MPS (Apple GPUs) is not available on this machine")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for but CUDA is not available on this machine")
        if dev.index is None:
            dev = torch.device(f"cuda:{local_rank}")
    return dev


def setup(device: str = "auto", timeout_minutes: float = DIST_TIMEOUT_MINUTES) -> DistInfo:
    """Initialise the process group when launched by torchrun (WORLD_SIZE > 1), else run alone.

    NCCL on GPUs, Gloo on CPU. Multi-node works with torchrun's usual --nnodes/--rdzv_* flags. A
    collective that waits longer than ``timeout_minutes`` for the other ranks fails (see
    :func:`timeout_error`); with NCCL, its watchdog ends the process instead.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    monitor = None
    if world_size > 1 and not dist.is_initialized():
        timeout = timedelta(minutes=timeout_minutes)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
            # binding the group to this rank's GPU lets NCCL collectives (barrier included) know it
            dist.init_process_group(backend="nccl", device_id=dev, timeout=timeout)
        else:
            dist.init_process_group(backend="gloo", timeout=timeout)
        if dist.is_gloo_available():
            monitor = dist.new_group(backend="gloo", timeout=timeout)
    return DistInfo(rank, world_size, local_rank, dev, timeout_minutes, monitor)


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of ``t`` over ranks (``t`` itself when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


def timeout_error(info: DistInfo, error: BaseException, where: str) -> RankTimeout | None:
    """For ``error``, raised by a collective ``where`` (``"after 37 training steps"``): if it is a
    timeout, the :class:`RankTimeout` to raise instead, saying what timed out and which ranks did
    not answer a check made then; else None.

    The check is a collective of the live ranks: each calls this when its own collective times
    out, as each does, within about a step of the others."""
    if not info.enabled or not _TIMED_OUT.search(str(error)):
        return None
    first_line = re.sub(r"^\[[^\]]*\]\s*", "", str(error).strip().splitlines()[0])  # without "[file.cc:78]"
    return RankTimeout(
        f"rank {info.rank} of {info.world_size} waited longer than dist_timeout_minutes = {info.timeout_minutes:g} "
        f"for the other ranks in a collective operation {where} ({first_line}); {_missing_ranks(info)}. A rank "
        "that is only slow (a long evaluation or checkpoint) needs a longer --set dist_timeout_minutes=M")


def _missing_ranks(info: DistInfo) -> str:
    """Which ranks answer now: Gloo's monitored barrier has rank 0 wait for each of the others."""
    if info.monitor is None:
        return "the ranks that print no such error are the missing ones"
    check = min(MISSING_RANK_CHECK, timedelta(minutes=info.timeout_minutes))
    try:
        dist.monitored_barrier(group=info.monitor, timeout=check, wait_all_ranks=True)
    except RuntimeError as e:
        missing = re.search(r"Ranks? ([\d, ]+) failed to pass monitoredBarrier", str(e))
        if missing:
            ranks = missing.group(1).strip(", ")
            return f"rank{'s' if ',' in ranks else ''} {ranks} did not answer a check made then: stopped, hung or dead"
        # a rank other than 0 hears only from rank 0, which answers once every rank has come
        return ("rank 0 did not confirm that every rank answered a check made then: its error names the "
                "missing ranks (if it printed none, rank 0 is the one missing)")
    return ("every rank answered a check made then: one was slower than the timeout, not gone (stopped for a "
            "while, or a long evaluation or checkpoint)")
