"""Every Python block of README.md runs as written, read from the README at test time (so that it follows the
README's edits), with a reduced budget. A block names what the user supplies in a `# yours: a, b` comment; the
test gives those names stand-ins, and a name it has no stand-in for is a failure, as is any other missing
import or name."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: What the test runs in place of the names a block marks as the user's.
STAND_INS = {
    "my_module": "from m2n2_lightning.specialists import Classifier\nmy_module = Classifier(hidden=32)\n",
    "my_datamodule": "from m2n2_lightning.data import DigitsDataModule\nmy_datamodule = DigitsDataModule()\n",
    "lm_module": (
        "from transformers import AutoModelForCausalLM\nfrom m2n2_lightning.lm.merge import LanguageModel\n"
        "lm_module = LanguageModel(AutoModelForCausalLM.from_pretrained(SEED_DIR / 'base'))\n"
    ),
    "exact_match_by_generation": "from m2n2_lightning.lm.tasks import exact_match as exact_match_by_generation\n",
    "train_prompts": (
        "from m2n2_lightning.lm.tasks import PromptDataset, skill_dataset\n"
        "_all = skill_dataset(('add', 'rev'), 'train')\n"
        "train_prompts = PromptDataset(_all.pairs[:4] + _all.pairs[-4:], _all.skills[:4] + _all.skills[-4:])\n"
    ),
}
#: The reduced budget: (pattern, replacement) applied to every block.
REDUCED = (
    (r"max_forward_passes=[\d_]+", "max_forward_passes=100"),
    (r"max_steps=[\d_]+", "max_steps=4"),
    (r"forward_passes < [\d_]+", "forward_passes < 100"),
    (r"init_from=\[[^\]]*\]", "init_from=[SEED_DIR / 'skill_a', SEED_DIR / 'skill_b']"),  # the tiny toy seeds
)


def python_blocks() -> list[tuple[str, str]]:
    """(the heading above it, the code) of every ```python block of README.md."""
    text = (ROOT / "README.md").read_text()
    blocks = []
    for match in re.finditer(r"```python\n(.*?)```", text, re.S):
        heading = re.findall(r"^#+ (.+)$", text[: match.start()], re.M)[-1]
        blocks.append((heading, match.group(1)))
    return blocks


def yours(code: str) -> list[str]:
    """The names a block marks as the user's (`# yours: name (what it is), name`)."""
    names = []
    for line in re.findall(r"#\s*yours:(.*(?:\n#(?!\s*yours:).*)*)", code):
        text = re.sub(r"\([^)]*\)", "", line.replace("\n#", " "))  # explanations in brackets
        names += [word.split()[0] for word in text.split(",") if word.split()]
    return [name for name in names if name.isidentifier()]


BLOCKS = python_blocks()


def test_the_readme_has_its_python_blocks() -> None:
    assert len(BLOCKS) >= 4 and any("M2N2Callback" in code for _, code in BLOCKS)


@pytest.mark.parametrize(
    "heading,code",
    [pytest.param(h, c, marks=[pytest.mark.slow] if "init_from" in c or "M2N2Callback(" in c else []) for h, c in BLOCKS],
    ids=[f"{i}-{h[:30]}" for i, (h, _) in enumerate(BLOCKS)],
)
def test_a_readme_python_block_runs(heading: str, code: str, tmp_path: Path) -> None:
    missing = [name for name in yours(code) if name not in STAND_INS]
    assert not missing, f"README block under {heading!r} marks {missing} as the user's: add stand-ins to this test"
    prelude = "import os\nfrom pathlib import Path\n"
    if "init_from" in code:  # the tiny toy seed models (built once per test, a few seconds)
        prelude += ("from m2n2_lightning.lm import seeds\nfrom test_lm_merge import TINY\n"
                    "SEED_DIR = Path(os.getcwd()) / 'seeds'\nseeds.build_seeds(SEED_DIR, TINY)\n")
    prelude += "".join(STAND_INS[name] for name in yours(code))
    for pattern, replacement in REDUCED:
        code = re.sub(pattern, replacement, code)
    (tmp_path / "block.py").write_text(prelude + code)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)])}
    result = subprocess.run([sys.executable, "block.py"], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                            env=env)
    assert result.returncode == 0, f"README block under {heading!r} failed:\n{code}\n{result.stderr[-3000:]}"
