"""Archive: the population buffers (members, scores, occupancy) written by hand, and their state_dict."""

from __future__ import annotations

import copy

import pytest
import torch

from m2n2_lightning.strategies.archive import Archive
from m2n2_lightning.strategies.children import Children


def member(value: float) -> Children:
    """One dense child [1, 3] of all `value`s (written as row 0)."""
    return Children.of(torch.full((1, 3), value))


def started_archive() -> Archive:
    """Archive(4, 3) with N = 5 and two rows written by hand: slot 2 = 7s, slot 0 = -1s."""
    archive = Archive(4, 3)
    archive.allocate(5)
    archive.write(torch.tensor(2), member(7.0), 0, torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0]))
    archive.write(torch.tensor(0), member(-1.0), 0, torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0]))
    archive.write(torch.tensor(4), member(9.0), 0, torch.ones(5))  # slot P: the newcomer lost
    archive.write(torch.tensor(1), member(9.0), 0, torch.ones(5), accept=torch.tensor(False))
    return archive


def test_archive_allocate_and_write_by_hand() -> None:
    archive = Archive(4, 3)
    assert archive.num_resources == 0 and archive.scores.shape == (4, 0) and not archive.occupied.any()
    archive = started_archive()
    assert archive.num_resources == 5
    assert archive.occupied.tolist() == [True, False, True, False]
    expected = torch.tensor([[-1.0] * 3, [0.0] * 3, [7.0] * 3, [0.0] * 3])
    assert torch.equal(archive.members, expected)
    assert archive.scores.sum(dim=1).tolist() == [1.0, 0.0, 3.0, 0.0]
    assert torch.equal(archive.rows(torch.tensor([2, 0])), expected[[2, 0]])


def test_unstarted_archive_takes_n_from_a_started_archives_state_dict() -> None:
    state = copy.deepcopy(started_archive().state_dict())
    fresh = Archive(4, 3)
    fresh.load_state_dict(state)
    assert fresh.num_resources == 5
    for name in ("members", "scores", "occupied"):
        assert torch.equal(getattr(fresh, name), state[name]), name
    # and continues like the original
    original = started_archive()
    for archive in (original, fresh):
        archive.write(torch.tensor(3), member(4.0), 0, torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0]))
    assert torch.equal(fresh.members, original.members) and torch.equal(fresh.scores, original.scores)


def test_archive_state_dict_of_another_n_or_capacity_is_refused() -> None:
    state = started_archive().state_dict()
    other_n = Archive(4, 3)
    other_n.allocate(6)  # started with N = 6: keeps it and refuses N = 5
    with pytest.raises(RuntimeError, match="size mismatch for scores"):
        other_n.load_state_dict(state)
    with pytest.raises(RuntimeError, match="size mismatch for members"):
        Archive(5, 3).load_state_dict(state)
