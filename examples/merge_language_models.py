"""Merge two fine-tuned Hugging Face language models with M2N2, scoring each candidate by generation.

The paper's LLM experiment (section 4.2) at laptop scale: two fine-tunes of one small Llama base
(m2n2_lightning/lm: one adds two-digit numbers, one reverses four letters) are merged from their
save_pretrained directories with an archive of 15, no mutation, a warm-up of 50 random merges among
the seeds and 1,000 evaluations, each candidate scored per training prompt by exact match of greedy
generation. The merge is tested on both skills and on copying, a skill of the base that no score sees.

    OMP_NUM_THREADS=1 python examples/merge_language_models.py                  # about a minute here
    OMP_NUM_THREADS=1 python examples/merge_language_models.py --continuous     # capacity "max", char-level score

(The package's seed models are built on first use, with a progress bar and its ETA: 208 s measured on one
thread of this 2-core machine with nothing else running (`python -m m2n2_lightning.lm.seeds --seed 0`). The
paper's baselines at the same budget: `python benchmarks/compare.py --setting lm_merge`; the Hydra entry:
`python train.py experiment=lm_merge`.)

For your own models, change three things in `main`:
- `seeds` and `model`: your two (or more) save_pretrained directories or hub ids of one architecture,
  e.g. ["WizardLMTeam/WizardMath-7B-V1.0", "AgentGym/AgentEvol-7B"], and the model that holds each
  candidate while it is scored (`AutoModelForCausalLM.from_pretrained(<one of them>, torch_dtype=torch.bfloat16)`).
- `resources` and `tests`: fixed-order datasets of your prompts with their answers, e.g. the first 1,319
  GSM8K training problems as resources and its 1,319 test problems as a test set.
- `score` (and `test_fn`): `score(model, batch) -> [B]` in [0, 1], one score per prompt of a DataLoader
  batch of `resources` (for GSM8K: generate with your tokenizer and chat template, parse the final number,
  compare); `test_fn(model, dataset) -> float`, its mean over a test set.
Memory: with `storage="coefficients"` the archive holds the seeds once, in their own dtype, and each
member as a few coefficients; a candidate is written straight into the model's parameters. Two 7B
models in bf16 (13.5 GB each) then need three copies of one model, about 41 GB (the two seeds and the
model that scores a candidate), plus the activations of generation; with `host_seeds=True` the seeds
stay in host memory (27 GB) and the GPU holds the one model. A dense archive of 15 would add 200 GB.
The figures, measured at 0.5B and on paper at 7B: benchmarks/RESULTS.md, "Merging at real size".
Time is the scores: 1,000 evaluations of 1,319 generated answers each.
"""

from __future__ import annotations

import argparse
import functools

import torch
from transformers import AutoModelForCausalLM

from m2n2_lightning import M2N2Strategy
from m2n2_lightning.loggers import quiet_lightning
from m2n2_lightning.lm.merge import merge_models
from m2n2_lightning.lm.seeds import build_seeds, default_cache, preset
from m2n2_lightning.lm.tasks import accuracy, char_fraction, exact_match, skill_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0, help="seed of the seed models and of the search")
    parser.add_argument("--evaluations", type=int, default=1000)
    parser.add_argument("--out", default="outputs/merged_lm", help="save_pretrained directory of the merge")
    parser.add_argument("--continuous", action="store_true",
                        help="score by the fraction of answer characters right, with capacity c_j = max_i s_ij (eq. 5)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    quiet_lightning()

    cache = default_cache(seed=args.seed)
    build_seeds(cache, preset(seed=args.seed))  # the package's seeds; replace by your own directories
    seeds = [cache / "skill_a", cache / "skill_b"]
    model = AutoModelForCausalLM.from_pretrained(cache / "base").eval()
    resources = skill_dataset(("add", "rev"), "train")  # 100 prompts of each skill, fixed order
    tests = {name: skill_dataset((name,), "test") for name in ("add", "rev", "copy")}
    score = char_fraction if args.continuous else exact_match

    for name, directory in zip(("skill A fine-tune", "skill B fine-tune"), seeds):
        seed_model = AutoModelForCausalLM.from_pretrained(directory).eval()
        print(name, {skill: round(accuracy(seed_model, data), 3) for skill, data in tests.items()})

    strategy = functools.partial(
        M2N2Strategy, pop_size=15, warmup_steps=50, storage="coefficients", seed=args.seed,
        capacity="max" if args.continuous else "unit",
    )
    result = merge_models(strategy, seeds, model, resources, tests, args.evaluations, score=score, test_fn=accuracy)
    print("merged", {skill: round(acc, 3) for skill, acc in result.test.items()},
          f"({result.forward_passes} evaluations in {result.wall_seconds:.0f} s)")
    final = result.curve[-1]
    print(f"archive at the end: coverage {final['coverage']:.3f}, fitness entropy {final['fitness_entropy']:.3f} nats")
    model.save_pretrained(args.out)  # AutoModelForCausalLM.from_pretrained(args.out) loads the merge
    print(f"saved to {args.out}/")


if __name__ == "__main__":
    main()
