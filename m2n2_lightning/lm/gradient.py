"""The gradient baseline of the language-model merge: fine-tune on the merge's training prompts instead of merging.

The paper's "no forgetting" comparison (docs/ALGORITHM.md, "Beyond the digits"): M2N2 merges
the fine-tunes by scoring candidates on the training prompts (the resources), so the fair
gradient alternative fine-tunes one model (the base, or a fine-tune) on exactly those
prompts, all trained skills together, for the same budget. A merge evaluation scores one
candidate on all N prompts (N example forward passes), so E evaluations match E x N
*example passes*, and a gradient step on a batch of b examples counts b of them. The
backward pass is not counted: a step costs about three forward passes (one forward, a
backward of about two), so the baseline gets ~3x the compute of the merge's count; every
result reports both numbers. The merge's forward passes are greedy generations (a few
tokens each), the baseline's teacher-forced ones (one pass over prompt and answer).

The learning rate is chosen from a small grid by the final training-prompt accuracy (the
merge's choice never sees a test prompt either); every grid point's accuracies are reported.
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from m2n2_lightning.checks import check_positive_int
from m2n2_lightning.lm.merge import AccuracyFn, AccuracyPoint, MergeResult
from m2n2_lightning.lm.tasks import TOKENIZER, Pair, accuracy

#: The default learning-rate grid.
LR_GRID = (1e-4, 3e-4, 1e-3)
#: Forward-pass equivalents of one example's training step (its forward, and a backward of about two forwards).
STEP_COST = 3
#: `encode(prompts, answers) -> (input ids, attention mask, labels)` for teacher forcing on the answers.
EncodeFn = Callable[[Sequence[str], Sequence[str]], tuple[Tensor, Tensor, Tensor]]


def batch_schedule(n: int, example_passes: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Indices into n examples, in batches of `batch_size` totalling exactly `example_passes`.

    The examples are a stream of epochs, each a fresh permutation drawn from
    `random.Random(seed)`; the stream is cut into batches (a batch may straddle
    two epochs) and the last batch is cut short to the budget.
    """
    check_positive_int("n", n, 1)
    check_positive_int("example_passes", example_passes, 1)
    check_positive_int("batch_size", batch_size, 1)
    rng, order, left = random.Random(seed), [], example_passes
    while left:
        size = min(batch_size, left)
        while len(order) < size:
            epoch = list(range(n))
            rng.shuffle(epoch)
            order += epoch
        yield order[:size]
        order, left = order[size:], left - size


def warmup_cosine(steps: int) -> Callable[[int], float]:
    """The learning-rate factor of step s: linear warm-up over the first 5% of the steps, then a cosine to zero."""
    warmup = max(1, steps // 20)
    return lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))


def adamw_with_schedule(model: nn.Module, lr: float, steps: int) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW (no weight decay) and its `warmup_cosine` schedule over `steps`: the seed builds' and this baseline's."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps))


def answer_step(model: nn.Module, optimizer: torch.optim.Optimizer, schedule: Any, batch: tuple[Tensor, Tensor, Tensor]) -> None:
    """One step on the answers of an encoded batch (ids, mask, labels: teacher forcing), gradients clipped to norm 1,
    then the schedule's step."""
    device = next(model.parameters()).device
    ids, mask, labels = (t.to(device) for t in batch)
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    schedule.step()


def train_run(
    model: nn.Module,
    pairs: Sequence[Pair],
    tests: Mapping[str, Any],
    example_passes: int,
    lr: float,
    test_fn: AccuracyFn = accuracy,
    batch_size: int = 64,
    seed: int = 0,
    test_every: int = 0,
    encode: EncodeFn = TOKENIZER.batch_train,
) -> tuple[list[AccuracyPoint], list[int]]:
    """AdamW on the answers of `pairs` (teacher forcing, gradients clipped to norm 1) for `example_passes`; `model`
    is trained in place and left in eval mode.

    Returns the test points and the example passes done at each: at the start, after the first step that
    completes each `test_every` evaluation-equivalents (`test_every` x
    len(pairs) example passes; at most batch_size - 1 passes late) and at the
    end, each labelled with the whole evaluation-equivalents done and the
    training seconds (the tests are off the clock).
    """
    check_positive_int("test_every", test_every, 0)
    steps = math.ceil(example_passes / check_positive_int("batch_size", batch_size, 1))
    optimizer, schedule = adamw_with_schedule(model, lr, steps)
    n, passes, seconds = len(pairs), 0, 0.0

    def point() -> AccuracyPoint:
        model.eval()
        return AccuracyPoint(passes // n, seconds, {name: float(test_fn(model, data)) for name, data in tests.items()})

    points, at = [point()], [0]
    for indices in batch_schedule(n, example_passes, batch_size, seed):
        start = time.perf_counter()
        model.train()
        answer_step(model, optimizer, schedule, encode(*zip(*(pairs[i] for i in indices))))
        before, passes = passes, passes + len(indices)
        seconds += time.perf_counter() - start
        if passes == example_passes or (test_every and passes // (test_every * n) > before // (test_every * n)):
            points.append(point())
            at.append(passes)
    model.eval()
    return points, at


def load_start(start: nn.Module | str | Path) -> nn.Module:
    """`start` itself, or the causal LM saved (`save_pretrained`) at that path, in eval mode."""
    if isinstance(start, nn.Module):
        return start
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(start).eval()


def gradient_fine_tune(
    start: nn.Module | str | Path,
    pairs: Sequence[Pair],
    tests: Mapping[str, Any],
    example_passes: int,
    test_fn: AccuracyFn = accuracy,
    train_data: Any = None,
    lrs: Sequence[float] = LR_GRID,
    batch_size: int = 64,
    seed: int = 0,
    test_every: int = 0,
    encode: EncodeFn = TOKENIZER.batch_train,
) -> MergeResult:
    """Fine-tune `start` on the training `pairs` once per learning rate in `lrs` (`train_run`, each from the start
    weights and the same batches) and keep the run with the best final `test_fn(model, train_data)` (the first on
    ties); a module `start` then holds it.

    Args:
        start: the model to fine-tune (a module, trained in place) or a `save_pretrained` directory.
        pairs: the training (prompt, answer) pairs: the merge's resources, every trained skill; nothing else is
            trained on.
        tests: named test sets, each scored by `test_fn(model, data)` at every test point.
        example_passes: the budget: the merge's evaluations x len(pairs) (one step on b examples spends b).
        test_fn: the accuracy reported on `tests` and on `train_data`.
        train_data: what `test_fn` scores as the training accuracy (default: `pairs`).
        lrs: the learning-rate grid.
        batch_size: examples per step (the last step takes what is left of the budget).
        seed: the seed of the epochs' shuffles.
        test_every: test every this many evaluation-equivalents (0: at the start and the end only).
        encode: (prompts, answers) -> ids, mask, labels (-100 off the answers), default the skills' tokenizer.

    The result's `forward_passes` is in evaluation-equivalents (example passes / len(pairs)), so that its
    curve lines up with a merge's; `settings` holds the example passes, their forward-pass equivalents with the
    backward counted (`STEP_COST` x), the chosen learning rate and every grid point's accuracies and test points.
    """
    if not pairs:
        raise ValueError("pairs must hold at least one (prompt, answer) training pair")
    if not lrs or any(not lr > 0 for lr in lrs):
        raise ValueError(f"lrs must be a non-empty list of positive learning rates, got {lrs!r}")
    check_positive_int("example_passes", example_passes, 1)
    train_data = pairs if train_data is None else train_data
    model = load_start(start)
    initial = copy.deepcopy(model.state_dict())
    runs, best = {}, None
    for lr in lrs:
        model.load_state_dict(initial)
        points, at = train_run(model, pairs, tests, example_passes, lr, test_fn, batch_size, seed, test_every, encode)
        train = float(test_fn(model, train_data))
        runs[lr] = {"train": train, "test": points[-1].test, "wall_seconds": points[-1].wall_seconds,
                    "test_points": [{**vars(p), "example_passes": n} for p, n in zip(points, at)]}
        if best is None or train > runs[best[0]]["train"]:
            best = (lr, points, copy.deepcopy(model.state_dict()))
    lr, points, state = best
    model.load_state_dict(state)
    settings = {
        "lr": lr, "batch_size": batch_size, "seed": seed, "steps": math.ceil(example_passes / batch_size),
        "example_passes": example_passes, "forward_pass_equivalents": STEP_COST * example_passes,
        "grid_example_passes": len(lrs) * example_passes, "grid": runs,
    }
    return MergeResult(test=dict(points[-1].test), train=runs[lr]["train"], forward_passes=example_passes // len(pairs),
                       wall_seconds=points[-1].wall_seconds, test_points=points, settings=settings)
