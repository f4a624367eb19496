"""The archive a population strategy keeps: members, their scores, which slots are filled.

`Archive` is the dense storage: members [P, D], scores [P, N] and occupancy
[P] as buffers on the device (docs/ALGORITHM.md, "Objects"; empty slots hold zeros and
all-zero scores). A strategy reads members by index, reads the scores, makes
children from pairs of members and writes a row; it never touches the storage
itself, so other storages (coefficients over seed models, host memory) can
take its place behind the same methods.

Speed: at the paper's sizes a step is a few dozen small kernels. Where the
buffers live on the CPU, reading a value back to the host is free, so
`crossover` and `write` read the split points and the slot and use slices and
row copies; on an accelerator they use masks and never synchronise. Both ways
give bit-identical results (tests/test_speed_paths.py). `host_side` is that
one choice.

Storages (`build_archive`, chosen by `M2N2Strategy(storage=...)`): "dense"
(this class), "host" and "mmap" (`HostArchive`: the dense members in host
memory or in a memory-mapped file, for archives larger than the device; docs/ALGORITHM.md,
"Memory": "for very large models we can always store the archive on disk") and
"coefficients" (`CoefficientArchive`: members as mixtures of the seed models,
when merging without mutation).
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from m2n2_lightning.params import FlatParams
from m2n2_lightning.strategies import operators as ops
from m2n2_lightning.strategies.children import Children
from m2n2_lightning.strategies.chromosomes import Piece
from m2n2_lightning.strategies.coefficient_archive import CoefficientArchive
from m2n2_lightning.strategies.mixture import SeedVectors
from m2n2_lightning.strategies.score_table import ScoreTable

#: The archive storages `build_archive` makes.
STORAGES = ("dense", "coefficients", "host", "mmap")


class Archive(ScoreTable):
    """Dense storage of P members of D parameters (and, from `ScoreTable`, their scores on N resources)."""

    def __init__(self, capacity: int, num_params: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__(capacity)
        self.num_params = num_params
        self.register_buffer("members", self._new_members(dtype))

    @property
    def like(self) -> Tensor:
        """A tensor of the members' dtype and device (for random draws and casts)."""
        return self.members

    @property
    def host_side(self) -> bool:
        """Whether the storage is in host memory, where reading values back costs nothing."""
        return self.members.device.type == "cpu"

    def _new_members(self, dtype: torch.dtype) -> Tensor:
        """All-zero members [P, D] (the empty slots)."""
        return torch.zeros(self.capacity, self.num_params, dtype=dtype)

    def member_children(self, index: Tensor) -> Children:
        return Children(values=self.members.index_select(0, index))

    def initial_children(
        self, init_models: Sequence[Tensor] | None, init_sigma: float, generator: torch.Generator
    ) -> Children:
        """The members a run starts from: the seed models, or two random N(0, sigma^2) ones (docs/ALGORITHM.md)."""
        like = self.like
        if init_models is not None:
            return Children(values=torch.stack([model.to(like) for model in init_models]))
        noise = torch.randn(2, self.num_params, generator=generator, device=like.device, dtype=like.dtype)
        return Children(values=noise * init_sigma)

    def copies(self, index: Tensor) -> Children:
        """Children that copy the members at `index` (the "no crossover" ablation)."""
        return self.member_children(index)

    def crossover(self, first: Tensor, second: Tensor, split: Tensor | None, weight: Tensor) -> Children:
        """Split-point SLERP children of the member pairs (first[i], second[i]).

        `weight` [m, 1] is the mixing ratio w, `split` [m] the split point (None:
        w everywhere, the ablation). The ratio takes two values only (w before the
        split, 1 - w from it on), so the sines are evaluated once per child.
        """
        a, b = self.rows(first), self.rows(second)
        if split is None:
            return Children(values=ops.slerp(a, b, weight))
        coef_a, coef_b = ops.slerp_weights(ops.cosine(a, b), torch.cat([weight, 1 - weight], dim=-1))
        if self.host_side:
            return Children(values=ops.combine_by_slices(a, b, coef_a, coef_b, split.tolist()))
        return Children(values=ops.combine_by_mask(a, b, coef_a, coef_b, split))

    def crossover_by_pieces(
        self, first: Tensor, second: Tensor, pieces: Sequence[Sequence[Piece]], ratios: Tensor, per_part: bool
    ) -> Children:
        """SLERP children of (first[i], second[i]) made piece by piece (`chromosomes`).

        Each piece (start, stop, label) of child i mixes its range with ratio
        `ratios[i, label]`; the angle is the whole vectors' one, or with
        `per_part` the one between the parents' sub-vectors of that label.
        """
        a, b = self.rows(first), self.rows(second)
        child = torch.empty_like(a)
        for i, child_pieces in enumerate(pieces):
            t = ratios[i].unsqueeze(-1)
            if per_part:
                cos = part_cosines(a[i], b[i], child_pieces, len(t))
            else:
                cos = ops.cosine(a[i : i + 1], b[i : i + 1]).expand(len(t))
            coef_a, coef_b = (c.flatten().tolist() for c in ops.slerp_weights(cos, t))
            for start, stop, label in child_pieces:
                ops.mix_pair(a[i, start:stop], b[i, start:stop], coef_a[label], coef_b[label], child[i, start:stop])
        return Children(values=child)

    def _store(self, slot: int, children: Children, row: int) -> None:
        children.write(row, 0, self.num_params, self.members[slot])

    @torch.no_grad()
    def write(
        self, slot: Tensor, children: Children, row: int, member_scores: Tensor, accept: Tensor | None = None
    ) -> None:
        """`ScoreTable.write`; on an accelerator with masks, without reading the slot back to the host."""
        if self.host_side:
            super().write(slot, children, row, member_scores, accept)
            return
        member = children.dense()[row].to(self.members.dtype)
        keep = slot < self.capacity
        if accept is not None:
            keep = keep & accept
        index = slot.clamp(max=self.capacity - 1).reshape(1)
        # 1-dim index tensors throughout: a 0-dim one would be read back to the host.
        self.members.index_copy_(0, index, torch.where(keep, member.unsqueeze(0), self.members.index_select(0, index)))
        self.scores.index_copy_(0, index, torch.where(keep, member_scores.unsqueeze(0), self.scores.index_select(0, index)))
        self.occupied.index_copy_(0, index, self.occupied.index_select(0, index) | keep)


class HostArchive(Archive):
    """`Archive` whose members [P, D] stay in host memory, or in a memory-mapped file the OS pages.

    `.to(device)` moves the scores and occupancy but not the members (a change
    of dtype converts them in place of storage); rows are moved to the scores'
    device when read and written back by slot. For archives larger than the
    device ("host") or than the host memory ("mmap"; docs/ALGORITHM.md, "Memory"). The
    file of "mmap" is made in `storage_dir` (or the temporary directory), its
    disk space reserved at once (a full disk is a clear error now, not a
    SIGBUS later), and unlinked at once: it lives, unseen, as long as the
    archive. Results are bit-identical to the dense archive's; so is the state_dict.
    """

    def __init__(
        self,
        capacity: int,
        num_params: int,
        dtype: torch.dtype = torch.float32,
        mapped: bool = False,
        storage_dir: str | None = None,
    ) -> None:
        self.mapped = mapped
        self.storage_dir = storage_dir
        super().__init__(capacity, num_params, dtype)

    def _new_members(self, dtype: torch.dtype) -> Tensor:
        if not self.mapped:
            return torch.zeros(self.capacity, self.num_params, dtype=dtype)
        nbytes = self.capacity * self.num_params * torch.empty(0, dtype=dtype).element_size()
        handle, path = tempfile.mkstemp(prefix="m2n2-archive-", suffix=".bin", dir=self.storage_dir)
        try:
            reserve(handle, nbytes, os.path.dirname(path))
            # a new file reads as zeros: the empty slots cost no memory until written
            members = torch.from_file(path, shared=True, size=self.capacity * self.num_params, dtype=dtype)
        finally:
            os.close(handle)
            os.unlink(path)
        return members.view(self.capacity, self.num_params)

    @property
    def like(self) -> Tensor:
        return self.scores.new_empty(0, dtype=self.members.dtype)

    @property
    def host_side(self) -> bool:
        """Always: the members are read and written by slot, on the host."""
        return True

    def member_children(self, index: Tensor) -> Children:
        return Children(values=self.members.index_select(0, index.cpu()).to(self.scores.device))

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> HostArchive:
        members = self.members
        self._buffers["members"] = None  # skipped by Module._apply
        try:
            super()._apply(fn, *args, **kwargs)
        finally:
            self._buffers["members"] = members
        dtype = fn(members[:0]).dtype  # what the conversion asks for, read off an empty view
        if dtype != members.dtype:
            self._buffers["members"] = self._new_members(dtype).copy_(members)
        return self


def reserve(handle: int, nbytes: int, directory: str) -> None:
    """Reserve `nbytes` of disk for the open file `handle`, or a ValueError naming the directory and the bytes."""
    try:
        os.posix_fallocate(handle, 0, nbytes)
        return
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            if shutil.disk_usage(directory).free >= nbytes:  # no fallocate on this file system: check instead
                os.ftruncate(handle, nbytes)
                return
    free = shutil.disk_usage(directory).free
    raise ValueError(
        f"storage='mmap' needs {nbytes:,} bytes for its archive file in {directory}, but only {free:,} are free: "
        "free space there, point storage_dir at a larger disk, lower pop_size, or use storage='coefficients'"
    )


def build_archive(
    storage: str,
    capacity: int,
    num_params: int,
    seeds: Sequence[Tensor] | None,
    mutation_sigma: float,
    storage_dir: str | None = None,
    dtype: torch.dtype = torch.float32,
    host_seeds: bool = False,
    task_vectors: bool = False,
) -> Archive | CoefficientArchive:
    """The archive of `storage` (one of STORAGES), or a ValueError when that storage cannot hold the run.

    "coefficients" needs the seed models and no mutation: a mutated child is no
    longer a mixture of the seeds (docs/ALGORITHM.md, "Mutation": none when merging).
    """
    if storage not in STORAGES:
        raise ValueError(f"storage must be one of {STORAGES}, got {storage!r}")
    if storage_dir is not None and storage != "mmap":
        raise ValueError(f"storage_dir is where storage='mmap' maps its file; storage is {storage!r}")
    if task_vectors and storage != "coefficients":
        raise ValueError(
            f"task_vectors crosses the members' task vectors over the base, which storage='coefficients' keeps as a "
            f"seed; storage is {storage!r}: set storage=coefficients"
        )
    if host_seeds and storage != "coefficients":
        raise ValueError(f"host_seeds keeps the seeds of storage='coefficients' in host memory; storage is {storage!r}")
    if storage == "coefficients":
        if seeds is None:
            raise ValueError(
                "storage='coefficients' stores members as mixtures of the seed models: give init_models "
                "(two or more), or use storage='dense'"
            )
        if mutation_sigma > 0:
            raise ValueError(
                f"storage='coefficients' cannot hold mutated children (mutation_sigma={mutation_sigma}): a child with "
                "noise is no mixture of the seeds; set mutation_sigma=0 or use storage='dense', 'host' or 'mmap'"
            )
        return CoefficientArchive(capacity, num_params, seeds, dtype, host_seeds, task_vectors)
    if storage == "dense":
        return Archive(capacity, num_params, dtype)
    return HostArchive(capacity, num_params, dtype, mapped=storage == "mmap", storage_dir=storage_dir)


def part_cosines(a: Tensor, b: Tensor, pieces: Sequence[Piece], num_labels: int) -> Tensor:
    """cos(Omega) [L] between the sub-vectors of a and b [D] that carry each label (NaN for an empty label)."""
    wide = a.element_size() >= 4  # 16-bit members: float64 sums (`operators.dot_products`)
    sums = torch.zeros(3, num_labels, dtype=a.dtype if wide else torch.float64, device=a.device)
    for start, stop, label in pieces:
        x, y = a[start:stop], b[start:stop]
        if wide:
            sums[:, label] += torch.stack([torch.dot(x, y), torch.dot(x, x), torch.dot(y, y)])
        else:
            sums[:, label] += ops.dot_products(x[None], y[None])[:, 0]
    return sums[0] / (sums[1].sqrt() * sums[2].sqrt())


def seed_vectors(init_models: Sequence[nn.Module | Tensor] | Any | None, num_params: int) -> SeedVectors | Any | None:
    """Seed models as flat [D] vectors (views of given tensors, no copy), checked to have D parameters
    (ValueError naming the one that differs); a `SeedVectors` keeps its stack and digests."""
    if init_models is None:
        return None
    if len(init_models) < 2:
        raise ValueError(f"init_models must hold two or more models to merge, got {len(init_models)}")
    if hasattr(init_models, "segment"):  # seeds that stay in their files (`merging.seed_store.SeedFiles`)
        if init_models.shape[1] != num_params:
            raise ValueError(f"the seed models have {init_models.shape[1]} parameters, the model being evolved {num_params}")
        return init_models
    vectors = []
    for i, model in enumerate(init_models):
        vector = FlatParams(model).flatten(model) if isinstance(model, nn.Module) else torch.as_tensor(model).detach().reshape(-1)
        if vector.numel() != num_params:
            raise ValueError(
                f"init_models[{i}] has {vector.numel()} parameters but the model being evolved has {num_params}; "
                "give models of the same architecture"
            )
        if not vector.is_floating_point():
            raise ValueError(f"init_models[{i}] holds {vector.dtype} values; seed models must be floating point")
        vectors.append(vector)
    if isinstance(init_models, SeedVectors):
        return SeedVectors(vectors, init_models.stacked, init_models.digests)
    return SeedVectors(vectors)
