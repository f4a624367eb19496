"""Issue 24, reliability: the run-directory lock, checkpoints without evolution state, resumes of `evaluate`-hook
runs (resources by content, functions by a stable name), resumed finished runs, and the early checks."""

from __future__ import annotations

import errno
import functools
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import make_trainer
from torch import Tensor, nn
from torch.utils.data import IterableDataset

from m2n2_lightning import M2N2Callback, M2N2Strategy
from m2n2_lightning.checks import check_optimized_metric, check_resources
from m2n2_lightning.resume import check_evolution_state, dataset_hash, function_identity
from m2n2_lightning.run_lock import lock_run_directory

ROOT = Path(__file__).resolve().parents[1]


class Tiny(L.LightningModule):
    """A 4 -> 3 linear classifier whose train dataloader only paces the steps."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        return self.net.weight.sum() * 0

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(range(1000), batch_size=1)


def examples(order: list[int] | None = None) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 4, generator=g)
    y = x[:, :3].argmax(dim=1)
    return [(x[i], y[i]) for i in (order or range(12))]


def right(module: nn.Module, batch: tuple[Tensor, Tensor], weight: float = 1.0) -> Tensor:
    x, y = batch
    return (module(x).argmax(dim=1) == y).float() * weight


class Scorer:
    """A callable object as `evaluate`."""

    def __call__(self, module: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        return right(module, batch)


def fit(root: Path, steps: int, ckpt_path: Path | None = None, **options) -> M2N2Callback:
    options = {"evaluate": right, "resources": examples(), **options}
    callback = M2N2Callback(strategy=functools.partial(M2N2Strategy, pop_size=4, seed=0), resource_batch_size=6,
                            heatmap=False, **options)
    trainer = make_trainer(root, steps, [callback])
    trainer.fit(Tiny(), ckpt_path=ckpt_path)
    trainer.save_checkpoint(root / "last.ckpt")
    return callback


@pytest.fixture(scope="module")
def evaluate_run(tmp_path_factory) -> Path:
    """A checkpoint of a 6-step `evaluate`-hook run."""
    root = tmp_path_factory.mktemp("evaluate_run")
    fit(root, 6)
    return root / "last.ckpt"


# 1: one run per directory -----------------------------------------------------------------------------------------
def test_a_second_run_in_a_locked_directory_is_refused(tmp_path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from m2n2_lightning.run_lock import lock_run_directory; "
         f"lock_run_directory({str(tmp_path)!r}); print('locked', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ValueError, match=rf"another run \(pid {holder.pid}\) is writing to .*hydra.run.dir"):
            lock_run_directory(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    lock_run_directory(tmp_path)  # released when its holder died (even by SIGKILL)
    lock_run_directory(tmp_path)  # and taking it again in this process is a no-op


@pytest.mark.slow
def test_two_train_runs_in_one_directory_one_is_refused_the_other_finishes(tmp_path) -> None:
    # The first run must outlast the second's start (a few seconds of imports): 20,000 passes take ~50 s here,
    # where 3,000 once ended before the second looked at the lock on a fast CI machine.
    command = [sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={tmp_path}", "forward_passes=20000",
               "trainer.enable_progress_bar=false"]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    deadline = time.time() + 120
    while not (tmp_path / ".run.lock").exists() and time.time() < deadline:
        time.sleep(0.2)
    second = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert first.poll() is None, "the first run ended before the second started: the test did not test the lock"
    output, _ = first.communicate(timeout=600)
    assert first.returncode == 0, output[-3000:]
    assert second.returncode == 1 and "another run (pid" in second.stderr and "Traceback" not in second.stderr
    assert (tmp_path / "summary.json").exists() and (tmp_path / "best_model.pt").exists()


# 2: a checkpoint without evolution state --------------------------------------------------------------------------
def test_a_checkpoint_without_evolution_state_is_refused(tmp_path, evaluate_run) -> None:
    plain = torch.load(evaluate_run, weights_only=True)
    plain["callbacks"] = {}  # what a Lightning checkpoint of the same model without the callback holds
    renamed = torch.load(evaluate_run, weights_only=True)
    renamed["callbacks"] = {"OldName": renamed["callbacks"].pop("M2N2Callback")}
    for name, content in (("plain.ckpt", plain), ("renamed.ckpt", renamed)):
        path = tmp_path / name
        torch.save(content, path)
        with pytest.raises(ValueError, match="holds no evolution state"):
            check_evolution_state(torch.load(path, weights_only=True), path)  # train.py's check, before any data
        with pytest.raises(ValueError, match="holds no evolution state"):
            fit(tmp_path, 12, ckpt_path=path)  # the callback's, before any step
    check_evolution_state(torch.load(evaluate_run, weights_only=True), evaluate_run)


# 3 and 4: evaluate-hook resumes -----------------------------------------------------------------------------------
def test_an_evaluate_run_resumes_on_the_same_examples_only(tmp_path, evaluate_run) -> None:
    assert dataset_hash(examples()) == dataset_hash(examples())
    assert dataset_hash(examples()) != dataset_hash(examples(list(range(11, -1, -1))))
    with pytest.raises(ValueError, match="made on other resources"):
        fit(tmp_path, 12, ckpt_path=evaluate_run, resources=examples(list(range(11, -1, -1))))
    with pytest.raises(ValueError, match="made on other resources"):
        fit(tmp_path, 12, ckpt_path=evaluate_run, resources=examples()[:6] + examples()[:6])
    resumed = fit(tmp_path, 12, ckpt_path=evaluate_run)
    assert resumed.strategy.forward_passes > resumed.forward_passes_at_start > 0


def test_functions_have_a_stable_name_without_addresses() -> None:
    partial = functools.partial(right, weight=0.5)
    names = [function_identity(f) for f in (right, partial, Scorer(), Scorer().__call__)]
    assert names == [
        "test_reliability_three.right",
        "functools.partial(test_reliability_three.right, weight=0.5)",
        "test_reliability_three.Scorer object",
        "test_reliability_three.Scorer.__call__",
    ]
    code = ("import functools, test_reliability_three as t; from m2n2_lightning.resume import function_identity; "
            "print(function_identity(functools.partial(t.right, weight=0.5)))")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT / "tests", check=True)
    assert other.stdout.strip() == names[1]  # the same in a new process


def test_an_evaluate_run_with_another_function_says_the_function_differs(tmp_path, evaluate_run) -> None:
    with pytest.raises(ValueError, match=r"evaluate: 'test_reliability_three.right' in the checkpoint, "
                                         r"'functools.partial\(test_reliability_three.right, weight=0.5\)' now"):
        fit(tmp_path, 12, ckpt_path=evaluate_run, evaluate=functools.partial(right, weight=0.5))


# 9: a finished run resumed ---------------------------------------------------------------------------------------
def test_resuming_a_finished_run_counts_nothing_this_run(tmp_path, evaluate_run) -> None:
    callback = fit(tmp_path, 6, ckpt_path=evaluate_run)
    assert callback.forward_passes_at_start == callback.strategy.forward_passes > 0


# 8: checks that come early and say what is accepted ---------------------------------------------------------------
def test_resources_a_generator_is_read_an_iterable_dataset_is_refused(tmp_path) -> None:
    listed = check_resources((e for e in examples()), right)
    assert isinstance(listed, list) and all(torch.equal(a[0], b[0]) for a, b in zip(listed, examples(), strict=True))

    class Stream(IterableDataset):
        def __iter__(self):
            return iter(examples())

    for bad in (Stream(), None, (torch.zeros(2, 4), torch.zeros(2))):
        with pytest.raises(ValueError, match="fixed-order, sized dataset"):
            M2N2Callback(evaluate=right, resources=bad)
    with pytest.raises(TypeError, match=r"pair \(inputs, targets\)"):
        M2N2Callback(resources=iter([torch.zeros(3, 4)]))
    callback = fit(tmp_path, 2, resources=(e for e in examples()))  # a generator of examples works end to end
    assert callback.strategy.num_resources == 12


def test_optimized_metric_is_checked_by_name() -> None:
    check_optimized_metric("best_train_acc")
    check_optimized_metric(None)
    with pytest.raises(ValueError, match="optimized_metric='tset_acc' is not a summary.json number; use one of"):
        check_optimized_metric("tset_acc")


# 7: a full disk ----------------------------------------------------------------------------------------------------
class DiskFills(L.Callback):
    """Raise 'No space left on device' after training step `step`, as a full disk does in a write."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_step >= self.step:
            raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_names_the_checkpoint_to_resume_from_and_writes_nothing(tmp_path, lightning_log) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    from m2n2_lightning.checkpointing import InterruptCheckpoint
    from m2n2_lightning.checks import BadRunInput, report_in_one_line

    checkpoints = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)
    callback = M2N2Callback(strategy=functools.partial(M2N2Strategy, pop_size=4, seed=0), evaluate=right,
                            resources=examples(), heatmap=False)
    trainer = make_trainer(tmp_path, 20, [callback, checkpoints, InterruptCheckpoint(tmp_path), DiskFills(5)],
                           enable_checkpointing=True)
    with pytest.raises(BadRunInput, match="No space left on device"):
        report_in_one_line(trainer.fit)(Tiny())
    newest = tmp_path / "epoch=0-step=4.ckpt"
    text = lightning_log.text
    assert f"the disk holding {tmp_path} is full" in text and f"resume with ckpt_path={newest}" in text
    assert not (tmp_path / "interrupted.ckpt").exists()


# 8: a sweep whose job fails ----------------------------------------------------------------------------------------
def test_a_sweep_table_lists_the_finished_jobs_and_marks_the_failed_ones(tmp_path) -> None:
    from m2n2_lightning.sweep import FAILED_NAME, write_table

    for job, content in (("0", "summary"), ("1", "failed"), ("2", None)):
        (tmp_path / job / ".hydra").mkdir(parents=True)
        (tmp_path / job / ".hydra" / "overrides.yaml").write_text(f"- seed={job}\n")
        if content == "summary":
            (tmp_path / job / "summary.json").write_text('{"seed": 0, "test_acc": 0.5}')
        elif content == "failed":
            (tmp_path / job / FAILED_NAME).write_text("BadRunInput: pop_size must be an integer >= 2, got 1\n")
    write_table(tmp_path)
    table = (tmp_path / "summary.md").read_text()
    assert "| 0 | seed=0 | ok |" in table and "0.5000" in table
    assert "| 1 | seed=1 | failed: BadRunInput: pop_size must be an integer >= 2, got 1 |" in table
    assert "| 2 | seed=2 | not finished |" in table


@pytest.mark.slow
def test_a_train_sweep_with_a_failing_job_still_writes_its_table(tmp_path) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "-m", f"hydra.sweep.dir={tmp_path}", "forward_passes=50",
         "strategy.pop_size=20,1", "trainer.enable_progress_bar=false"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert result.returncode == 1 and "pop_size must be an integer >= 2, got 1" in result.stderr
    rows = (tmp_path / "summary.csv").read_text().splitlines()
    assert "strategy.pop_size=20" in rows[1] and ",ok," in rows[1]
    assert "strategy.pop_size=1 " in rows[2] and '"failed: BadRunInput: pop_size must be an integer >= 2, got 1"' in rows[2]


def test_a_bfloat16_module_is_scored_in_bfloat16(tmp_path) -> None:
    from conftest import Classifier

    from m2n2_lightning.data import DigitsDataModule

    class Bfloat16Classifier(Classifier):
        def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:  # its own cast, as a user's
            return super().training_step((batch[0].to(torch.bfloat16), batch[1]), batch_idx)

    module = Bfloat16Classifier().to(torch.bfloat16)
    callback = M2N2Callback(strategy=functools.partial(M2N2Strategy, pop_size=4, seed=0), heatmap=False)
    make_trainer(tmp_path, 6, [callback]).fit(module, datamodule=DigitsDataModule())
    assert callback.strategy.forward_passes == 6 and callback.engine.score_dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in module.parameters())


def test_an_evaluate_returning_a_meta_tensor_says_so(tmp_path) -> None:
    def meta(module: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        return torch.empty(len(batch[1]), device="meta")

    with pytest.raises(ValueError, match="returned a tensor on the meta device"):
        fit(tmp_path, 2, evaluate=meta)
