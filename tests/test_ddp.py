"""M2N2 and CMA-ES under Lightning's DDP (CPU processes, gloo) end bit-identical to one process.

tests/ddp_run.py runs the cases (EvolutionModule with M2N2, logs, validation
and checkpoints; a resume from its middle checkpoint; M2N2Callback; CMA-ES;
the default one block per rank) and every rank saves its final states; here
they are compared, tensor for tensor, with the same script run in one process
without any distributed strategy.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from m2n2_lightning.distributed import partition

SCRIPT = Path(__file__).with_name("ddp_run.py")
ROOT = SCRIPT.parents[1]
#: Cases whose blocks are fixed: bit-identical to one process.
BLOCKED_CASES = ("module", "resumed", "callback", "cmaes")


def assert_identical(actual: Any, expected: Any, where: str) -> None:
    """Equal tensors (dtype, shape, every bit) and equal plain values, recursively."""
    if isinstance(expected, dict):
        assert actual.keys() == expected.keys(), where
        for key in expected:
            assert_identical(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, torch.Tensor):
        assert actual.dtype == expected.dtype and torch.equal(actual, expected), where
    else:
        assert actual == expected, where


def launch(out: Path, devices: int) -> list[dict[str, Any]]:
    """Run the script on `devices` CPU processes; the states every rank saved."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), str(devices)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return [torch.load(out / f"states_{rank}.pt", weights_only=True) for rank in range(devices)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The same runs in this process, without DDP."""
    spec = importlib.util.spec_from_file_location("ddp_run", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path_factory.mktemp("one_process")
    threads = torch.get_num_threads()
    try:
        script.main(out, 1)
    finally:
        torch.set_num_threads(threads)
    return torch.load(out / "states_0.pt", weights_only=True)


def check_ranks(states: list[dict[str, Any]], reference: dict[str, Any]) -> None:
    for rank, rank_states in enumerate(states):
        for case in BLOCKED_CASES:
            assert_identical(rank_states[case], reference[case], f"rank {rank}: {case}")
        assert_identical(rank_states["one_block_per_rank"], states[0]["one_block_per_rank"], f"rank {rank}")
        assert "hold other resources than rank 0" in rank_states["mismatch_error"]
    # the resumed run ends where the uninterrupted one does
    assert_identical(states[0]["resumed"], states[0]["module"], "resumed vs uninterrupted")
    assert reference["module"]["strategy"]["_extra_state"]["forward_passes"] == 60


def test_two_ranks_match_one_process(tmp_path: Path, reference: dict[str, Any]) -> None:
    check_ranks(launch(tmp_path, 2), reference)
    # rank zero alone wrote the logs (one row per logged step) and the checkpoints
    logged = list(csv.DictReader(open(tmp_path / "logs" / "metrics.csv")))
    rows = [row for row in logged if row["forward_passes"]]
    assert [int(row["step"]) for row in rows] == [4, 9, 14, 19, 24, 29]
    assert len([row for row in logged if row.get("val/acc")]) == 2  # validated at steps 15 and 30
    assert float(rows[-1]["forward_passes"]) == 60
    assert sorted(path.name for path in (tmp_path / "ckpt").iterdir()) == ["step=15.ckpt", "step=30.ckpt"]
    assert (tmp_path / "logs" / "class_accuracy.png").is_file()


@pytest.mark.slow
def test_three_ranks_match_one_process(tmp_path: Path, reference: dict[str, Any]) -> None:
    check_ranks(launch(tmp_path, 3), reference)


def test_partition_into_contiguous_rank_shards() -> None:
    assert partition(1437, 1) == [[(0, 1437)]]
    assert partition(1437, 2) == [[(0, 719)], [(719, 1437)]]
    assert partition(1437, 3, 500) == [[(0, 500)], [(500, 1000)], [(1000, 1437)]]
    assert partition(1437, 2, 500) == [[(0, 500)], [(500, 1000), (1000, 1437)]]
    with pytest.raises(ValueError, match="2 blocks, fewer than the 3 ranks: use block_size <= 479"):
        partition(1437, 3, 1000)
    with pytest.raises(ValueError, match="3 resources cannot be shared among 4 ranks"):
        partition(3, 4)
