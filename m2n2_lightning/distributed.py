"""Scaling out with Lightning's DDP: resource shards, the score all-gather, and the strategy.

Every rank holds the same archive and the same generator (same seed, or the
same checkpoint), asks the same candidates, scores them on its own contiguous
shard of the resources, and all-gathers the per-example scores in resource
order. Every rank then tells the strategy the same [k, N] scores and makes the
same update: nothing else is ever communicated.

The resources are cut into blocks (each scored by one forward call) and the
blocks into contiguous runs, one per rank. With `block_size=None` there is one
block per rank. The rounding of a forward pass can depend on how many examples
it holds (BLAS kernels are chosen by shape), so a run on 2 ranks may, rarely,
score a near-tie differently from a run on 1 rank. A fixed `block_size` makes
every block the same forward call whatever the number of ranks, so the scores
and the archive are bit-identical for 1, 2, ... ranks (up to the number of
blocks), on identical hardware.

A rank that stops responding (stopped, hung, killed) makes the others fail
after the collective timeout, `EvolutionDDPStrategy(timeout=...)` (5 minutes
by default, not DDP's 30; `trainer.strategy.timeout=<seconds>` in train.py's
`trainer=ddp`), with a `RankTimeoutError` that says so. On gloo (CPUs) the
waiting collective raises; NCCL's watchdog aborts the process after the same
timeout, with its own message.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

#: The name of `EvolutionDDPStrategy` for `Trainer(strategy=...)`.
STRATEGY_NAME = "ddp_evolution"

#: A block of resources: examples [start, stop).
Block = tuple[int, int]

#: How long a collective waits for the other ranks before it fails (DDP's own default is 30 minutes).
DEFAULT_TIMEOUT = timedelta(minutes=5)

#: gloo's messages for a collective whose peer did not answer (a timeout, or the connection it then closed).
LOST_RANK_MESSAGES = (
    "Timed out waiting", "timeout caused pair closure", "Connection closed by peer", "Connection reset by peer"
)


def world() -> tuple[int, int]:
    """(rank, world size) of torch.distributed's default group; (0, 1) when it is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def partition(num_resources: int, world_size: int, block_size: int | None = None) -> list[list[Block]]:
    """The resources' blocks, grouped by rank: contiguous runs in resource order.

    `block_size=None`: one block per rank, their sizes differing by at most one.
    Otherwise blocks of `block_size` examples (the last one shorter), spread as
    evenly as their count allows. ValueError when some rank would get nothing.
    """
    if block_size is None:
        if num_resources < world_size:
            raise ValueError(f"{num_resources} resources cannot be shared among {world_size} ranks")
        base, extra = divmod(num_resources, world_size)
        sizes = [base + (rank < extra) for rank in range(world_size)]
        starts = [sum(sizes[:rank]) for rank in range(world_size)]
        return [[(start, start + size)] for start, size in zip(starts, sizes)]
    blocks = [(start, min(start + block_size, num_resources)) for start in range(0, num_resources, block_size)]
    if len(blocks) < world_size:
        raise ValueError(
            f"block_size={block_size} cuts the {num_resources} resources into {len(blocks)} blocks, fewer "
            f"than the {world_size} ranks: use block_size <= {-(-num_resources // world_size)}"
        )
    count = len(blocks)
    return [blocks[rank * count // world_size : (rank + 1) * count // world_size] for rank in range(world_size)]


def all_gather_scores(local: Tensor, shard_sizes: Sequence[int]) -> Tensor:
    """This rank's scores [k, n_rank] -> everyone's [k, N], in rank order (which is resource order).

    Shards differ in length by up to a block: each is padded to the longest
    for `all_gather` and the padding is stripped afterwards.
    """
    width = max(shard_sizes)
    padded = torch.nn.functional.pad(local, (0, width - local.shape[1])).contiguous()
    gathered = [torch.empty_like(padded) for _ in shard_sizes]
    dist.all_gather(gathered, padded)
    return torch.cat([scores[:, :size] for scores, size in zip(gathered, shard_sizes)], dim=1)


def _fingerprint(tensor: Tensor) -> tuple[tuple[int, ...], str, int]:
    """Shape, dtype and CRC-32 of the bytes of a tensor."""
    data = tensor.detach().contiguous().cpu().reshape(-1)
    return tuple(tensor.shape), str(tensor.dtype), zlib.crc32(data.view(torch.uint8).numpy())


def check_same_resources(inputs: Tensor, targets: Tensor) -> None:
    """ValueError on every rank unless all ranks were given the same resources (one all-gather)."""
    tensors = [*(inputs.values() if isinstance(inputs, dict) else [inputs]), targets]
    mine = tuple(_fingerprint(tensor) for tensor in tensors)
    everyone: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    differing = [rank for rank, theirs in enumerate(everyone) if theirs != everyone[0]]
    if differing:
        raise ValueError(
            f"ranks {differing} hold other resources than rank 0 (shape, dtype or content): every rank must "
            "collect the same examples in the same order. Use a train dataloader that does not shuffle, "
            "or give the resources explicitly."
        )


@torch.no_grad()
def broadcast_module_state(module: nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank (what DDP's constructor does)."""
    for tensor in (*module.parameters(), *module.buffers()):
        dist.broadcast(tensor.data, src=0)


def collective_timeout(timeout: float | timedelta) -> timedelta:
    """A collective timeout given in seconds (int or float) or as a timedelta, checked positive and finite."""
    seconds = timeout.total_seconds() if isinstance(timeout, timedelta) else timeout
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(
            f"the DDP collective timeout must be a positive number of seconds (or a datetime.timedelta), got "
            f"{timeout!r}; e.g. trainer.strategy.timeout=300 in train.py, EvolutionDDPStrategy(timeout=300) in Python"
        )
    return timeout if isinstance(timeout, timedelta) else timedelta(seconds=seconds)


class RankTimeoutError(RuntimeError):
    """A collective failed because another rank did not answer within the collective timeout (or went away)."""

    def __init__(self, timeout: timedelta, where: str, cause: BaseException) -> None:
        rank, world_size = world()
        super().__init__(
            f"rank {rank} of {world_size}: the other ranks did not answer within the collective timeout of "
            f"{timeout.total_seconds():g} s, or closed their connection ({where}): a rank stopped responding "
            "(stopped, hung, killed, or far slower than this one). Look at the other ranks; if they are only "
            "slow, raise the timeout with "
            "trainer.strategy.timeout=<seconds> (train.py, trainer=ddp) or EvolutionDDPStrategy(timeout=<seconds>). "
            f"The backend said: {cause}"
        )


def lost_rank(error: BaseException) -> bool:
    """Whether `error` is a collective that failed because a peer rank did not answer (gloo's messages)."""
    return isinstance(error, RuntimeError) and any(text in str(error) for text in LOST_RANK_MESSAGES)


class EvolutionDDPStrategy(DDPStrategy):
    """Lightning's DDP without the `DistributedDataParallel` wrapper, for gradient-free evolution.

    Use it as `Trainer(strategy="ddp_evolution", devices=N)` (registered under
    that name when `m2n2_lightning` is imported), as
    `Trainer(strategy=EvolutionDDPStrategy(...), ...)` with any `DDPStrategy`
    argument (`process_group_backend`, `start_method`, ...), or through
    `conf/trainer/ddp.yaml`. `timeout`: how long a collective waits for the
    other ranks, in seconds or as a timedelta (default `DEFAULT_TIMEOUT`, 5
    minutes); a rank that stops responding then makes the others fail with a
    `RankTimeoutError` (in the evolution step, barriers, broadcasts and
    reductions) instead of blocking them.

    Why not Lightning's plain "ddp": it wraps the LightningModule in
    `torch.nn.parallel.DistributedDataParallel`, whose only job is to average
    gradients in the backward pass. Evolution has no gradients, so the wrapper
    costs without helping: it refuses a module none of whose parameters
    requires grad (`M2N2Callback` turns `requires_grad` off, merged models
    may be frozen), it readies its reducer for a backward pass after each
    training forward that never comes, and it holds gradient buckets the size
    of the model. What evolution needs from
    the other ranks, the scores, the engine all-gathers itself
    (`all_gather_scores`). So `configure_ddp` does not wrap: it only
    broadcasts rank 0's parameters and buffers once, as the wrapper would have,
    so that every rank starts from the same module. Everything else is
    Lightning's DDP unchanged: the launchers (subprocesses, `torchrun`, SLURM
    and the other cluster environments, several nodes), the process group,
    distributed samplers, rank-zero logging and checkpointing, barriers, and
    the synchronisation of torchmetrics.
    """

    def __init__(self, *args: Any, timeout: float | timedelta = DEFAULT_TIMEOUT, **kwargs: Any) -> None:
        super().__init__(*args, timeout=collective_timeout(timeout), **kwargs)

    def configure_ddp(self) -> None:
        broadcast_module_state(self.model)

    @contextmanager
    def _explained(self, where: str) -> Iterator[None]:
        """Re-raise a collective's failure for want of a peer as a `RankTimeoutError` naming the timeout."""
        try:
            yield
        except RuntimeError as error:
            if not lost_rank(error):
                raise
            raise RankTimeoutError(self._timeout, where, error) from error

    def optimizer_step(self, *args: Any, **kwargs: Any) -> Any:
        with self._explained("in the evolution step's score all-gather"):
            return super().optimizer_step(*args, **kwargs)

    def barrier(self, *args: Any, **kwargs: Any) -> None:
        with self._explained("in a barrier"):
            super().barrier(*args, **kwargs)

    def broadcast(self, *args: Any, **kwargs: Any) -> Any:
        with self._explained("in a broadcast"):
            return super().broadcast(*args, **kwargs)

    def reduce(self, *args: Any, **kwargs: Any) -> Any:
        with self._explained("in a reduction"):
            return super().reduce(*args, **kwargs)


def warn_if_wrapped(trainer: L.Trainer) -> None:
    """Point users of Lightning's plain "ddp" to `EvolutionDDPStrategy` (it works, but wraps for nothing)."""
    if isinstance(trainer.strategy, DDPStrategy) and not isinstance(trainer.strategy, EvolutionDDPStrategy):
        rank_zero_warn(
            f"{type(trainer.strategy).__name__} wraps the module in DistributedDataParallel, which evolution "
            "does not use (no gradients) and which refuses modules without trainable parameters. Use "
            f"Trainer(strategy={STRATEGY_NAME!r}) (m2n2_lightning.distributed.EvolutionDDPStrategy) instead."
        )


if STRATEGY_NAME not in StrategyRegistry:
    StrategyRegistry.register(
        STRATEGY_NAME,
        EvolutionDDPStrategy,
        description="DDP without the DistributedDataParallel wrapper, for gradient-free evolution",
        start_method="popen",
    )
