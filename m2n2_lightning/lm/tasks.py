"""The skills of the small language-model merge: a character tokenizer, the tasks and their prompt sets.

A laptop-scale stand-in for the paper's LLM experiment (docs/ALGORITHM.md, "Beyond the
digits"): skill A is two-digit addition ("12+34=" -> "46"), skill B is string
reversal ("r:abcd=" -> "dcba"), and skill C, copying ("c:abcde=" -> "abcde"),
is learnt by the base only and scored by neither fine-tune, to measure
forgetting. Three more string skills serve the four-skill merge (seeds.py):
sorting ("s:dbca=" -> "abcd"), a Caesar shift by one ("n:abcz=" -> "bcda") and
doubling each letter ("d:abc=" -> "aabbcc"). Each skill has a fixed training set (the M2N2 resources) and a
disjoint test set, drawn from `PROMPT_SEED` whatever the model seed, so that
every seed model is scored on the same prompts and none was trained on them.
"""

from __future__ import annotations

import random
import string
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import Dataset

#: Seed of every skill's training and test prompts.
PROMPT_SEED = 0
N_TRAIN = 100
N_TEST = 200


class CharTokenizer:
    """One token per character of a fixed alphabet, plus pad (0), bos (1) and eos (2)."""

    SPECIALS = ("<pad>", "<bos>", "<eos>")
    ALPHABET = string.digits + string.ascii_lowercase + "+=:"

    def __init__(self) -> None:
        self.pad_id, self.bos_id, self.eos_id = 0, 1, 2
        self._ids = {c: i + len(self.SPECIALS) for i, c in enumerate(self.ALPHABET)}
        self.vocab_size = len(self.SPECIALS) + len(self.ALPHABET)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of `text`, optionally framed by bos / eos."""
        ids = [self._ids[c] for c in text]
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids` up to the first eos; pad and bos are skipped."""
        chars = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i >= len(self.SPECIALS):
                chars.append(self.ALPHABET[i - len(self.SPECIALS)])
        return "".join(chars)

    def batch_prompts(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Left-padded `bos + prompt` ids and attention mask [B, P], ready for generation."""
        seqs = [self.encode(p, bos=True) for p in prompts]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, s in enumerate(seqs):
            ids[row, width - len(s) :] = torch.tensor(s)
            mask[row, width - len(s) :] = 1
        return ids, mask

    def batch_train(self, prompts: Sequence[str], answers: Sequence[str]) -> tuple[Tensor, Tensor, Tensor]:
        """Right-padded `bos + prompt + answer + eos` ids, mask and labels [B, T] for teacher forcing.

        Labels are -100 on the prompt and the padding, so only the answer and
        its eos are learnt (as in instruction fine-tuning).
        """
        seqs, starts = [], []
        for p, a in zip(prompts, answers):
            head = self.encode(p, bos=True)
            seqs.append(head + self.encode(a, eos=True))
            starts.append(len(head))
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for row, (s, start) in enumerate(zip(seqs, starts)):
            ids[row, : len(s)] = torch.tensor(s)
            mask[row, : len(s)] = 1
            labels[row, start : len(s)] = ids[row, start : len(s)]
        return ids, mask, labels


TOKENIZER = CharTokenizer()
LETTERS = string.ascii_lowercase


@dataclass(frozen=True)
class Skill:
    """A task family: `kind` picks the rule, `lengths` the operand sizes drawn uniformly.

    add: `lengths` are the digit counts of each operand ("12+34=" -> "46");
    the string kinds (STRING_RULES): the letter counts ("r:abcd=" -> "dcba",
    "c:abcd=" -> "abcd"). The marker before ":" (MARKERS) keeps the string
    skills' inputs apart; addition is marked by its digits and "+". With
    probability `echo` the answer is the question repeated instead ("12+34",
    "abcd"): pre-training data in which the skill is present but not the
    most likely continuation.
    """

    name: str
    kind: str
    lengths: tuple[int, ...]
    echo: float = 0.0

    def __post_init__(self) -> None:
        if self.kind != "add" and self.kind not in STRING_RULES:
            raise ValueError(f"unknown skill kind {self.kind!r}; one of add, {', '.join(STRING_RULES)}")

    def sample(self, rng: random.Random) -> tuple[str, str]:
        """One random (prompt, answer) pair."""
        if self.kind == "add":
            a, b = (_number(rng, rng.choice(self.lengths)) for _ in range(2))
            prompt, question, answer = f"{a}+{b}=", f"{a}+{b}", str(a + b)
        else:
            question = "".join(rng.choice(LETTERS) for _ in range(rng.choice(self.lengths)))
            prompt, answer = f"{MARKERS[self.kind]}:{question}=", STRING_RULES[self.kind](question)
        if self.echo and rng.random() < self.echo:
            answer = question
        return prompt, answer


def _shift(text: str) -> str:
    """Each letter replaced by the next one, z by a (a Caesar shift by one)."""
    return "".join(LETTERS[(LETTERS.index(c) + 1) % len(LETTERS)] for c in text)


#: The string skills' rules, by kind, and the prompt marker of each (one letter, all distinct).
STRING_RULES = {
    "rev": lambda text: text[::-1],
    "copy": lambda text: text,
    "sort": lambda text: "".join(sorted(text)),
    "shift": _shift,
    "dup": lambda text: "".join(c + c for c in text),
}
MARKERS = {"rev": "r", "copy": "c", "sort": "s", "shift": "n", "dup": "d"}


def _number(rng: random.Random, digits: int) -> int:
    low = 0 if digits == 1 else 10 ** (digits - 1)
    return rng.randrange(low, 10**digits)


SKILL_A = Skill("add", "add", (2,))
SKILL_B = Skill("rev", "rev", (4,))
SKILL_C = Skill("copy", "copy", (4, 5))
SKILLS: dict[str, Skill] = {
    s.name: s for s in (SKILL_A, SKILL_B, SKILL_C, Skill("sort", "sort", (4,)), Skill("shift", "shift", (4,)),
                        Skill("dup", "dup", (3,)))
}

Pair = tuple[str, str]


def prompt_sets(
    skill: Skill, seed: int = PROMPT_SEED, n_train: int = N_TRAIN, n_test: int = N_TEST
) -> tuple[list[Pair], list[Pair]]:
    """A skill's fixed-order training and test (prompt, answer) lists: distinct prompts, disjoint sets."""
    rng = random.Random(f"{seed}:{skill.name}:{skill.kind}:{skill.lengths}")
    seen: dict[str, str] = {}
    while len(seen) < n_train + n_test:
        prompt, answer = skill.sample(rng)
        seen.setdefault(prompt, answer)
    pairs = list(seen.items())
    return pairs[n_test:], pairs[:n_test]


def held_out_prompts(seed: int = PROMPT_SEED) -> frozenset[str]:
    """Every skill's training and test prompts: the seed models never train on these."""
    return frozenset(p for s in SKILLS.values() for split in prompt_sets(s, seed) for p, _ in split)


class PromptDataset(Dataset):
    """(prompt, answer) pairs in a fixed order, with the skill of each; usable as M2N2 resources.

    The default DataLoader collate turns a batch into `[prompts, answers]`,
    which the scoring functions take as is.
    """

    def __init__(self, pairs: Sequence[Pair], skills: Sequence[str]) -> None:
        self.pairs, self.skills = list(pairs), list(skills)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> Pair:
        return self.pairs[index]


def skill_dataset(
    names: Sequence[str] = ("add", "rev"), split: str = "train", seed: int = PROMPT_SEED
) -> PromptDataset:
    """The named skills' training (the resources) or test prompts, one skill after the other."""
    pairs, skills = [], []
    for name in names:
        part = prompt_sets(SKILLS[name], seed)[0 if split == "train" else 1]
        pairs += part
        skills += [name] * len(part)
    return PromptDataset(pairs, skills)


Batch = Sequence[Sequence[str]]


@torch.no_grad()
def greedy_generate(model: torch.nn.Module, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
    """Greedy completions of `prompts` in one left-padded batch, with the KV cache, on the model's device;
    stops when all emit eos.

    Position ids count only real tokens, so a left-padded prompt is read
    exactly as the same prompt alone.
    """
    device = next(model.parameters(), torch.empty(0)).device  # the CPU for a module without parameters
    ids, mask = (t.to(device) for t in TOKENIZER.batch_prompts(prompts))
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    pos = pos[:, -1:]
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    tokens = []
    for step in range(max_new_tokens):
        tok = out.logits[:, -1].argmax(-1)
        tok = tok.masked_fill(done, TOKENIZER.eos_id)
        tokens.append(tok)
        done |= tok == TOKENIZER.eos_id
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        pos = pos + 1
        out = model(input_ids=tok[:, None], attention_mask=mask, position_ids=pos, cache=out.cache, use_cache=True)
    return [TOKENIZER.decode(row) for row in torch.stack(tokens, 1).tolist()]


def char_score(prediction: str, answer: str) -> float:
    """Fraction of aligned characters right, over the longer of the two (1.0 exactly when they are equal)."""
    hits = sum(p == a for p, a in zip(prediction, answer))
    return hits / max(len(prediction), len(answer), 1)


def _completions(model: torch.nn.Module, batch: Batch) -> tuple[list[str], list[str]]:
    prompts, answers = batch
    was_training = model.training
    model.eval()
    try:
        # One token past the longest answer: room for its eos, so no wrong prefix can pass.
        preds = greedy_generate(model, prompts, max(len(a) for a in answers) + 1)
    finally:
        model.train(was_training)
    return preds, list(answers)


def exact_match(model: torch.nn.Module, batch: Batch) -> Tensor:
    """Per-prompt 0/1 scores [B]: greedy completion equals the answer. `batch` is `(prompts, answers)`."""
    preds, answers = _completions(model, batch)
    return torch.tensor([float(p == a) for p, a in zip(preds, answers)])


def char_fraction(model: torch.nn.Module, batch: Batch) -> Tensor:
    """Per-prompt scores in [0, 1] [B]: `char_score` of the greedy completion (a smooth exact match)."""
    preds, answers = _completions(model, batch)
    return torch.tensor([char_score(p, a) for p, a in zip(preds, answers)])


def accuracy(model: torch.nn.Module, pairs: Sequence[Pair]) -> float:
    """Mean exact match over (prompt, answer) pairs."""
    return float(exact_match(model, ([p for p, _ in pairs], [a for _, a in pairs])).mean())
