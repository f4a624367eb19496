"""The report writer the benchmark scripts share.

A benchmark writes two things: its `## <title>` section of
benchmarks/RESULTS.md, which replaces the section of that title or is added
(after a named section, or at the end), leaving every other section as it is;
and the raw numbers as JSON under benchmarks/results/.

    from report import write_json, write_section
    write_section(RESULTS_MD, "## Throughput (...)\n\n| ... |")
    write_json(RESULTS_DIR / "throughput.json", rows)

The file is re-read right before it is written (other scripts may have
written their sections meanwhile) and replaced in one rename, so a reader
never sees half a file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS_MD = HERE / "RESULTS.md"
RESULTS_DIR = HERE / "results"
EMPTY = "# Benchmark results\n"


def _find(lines: list[str], heading: str) -> tuple[int, int] | None:
    """[start, end) of the lines of the section `heading` ("## ..."), up to the next "## " line."""
    start = next((i for i, line in enumerate(lines) if line.strip() == heading), None)
    if start is None:
        return None
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return start, end


def replace_section(document: str, text: str, after: str | None = None) -> str:
    """`document` with the section whose heading is `text`'s first line replaced by `text`.

    A missing section is inserted after the section `after` (its heading,
    e.g. "## Throughput") when there is one, else appended at the end.
    """
    section = text.strip("\n").splitlines()
    heading = section[0].strip() if section else ""
    if not heading.startswith("## "):
        raise ValueError(f"a section starts with its '## <title>' line, got {heading!r}")
    lines = document.splitlines()
    found = _find(lines, heading)
    if found is None:
        anchor = _find(lines, after) if after else None
        found = (anchor[1], anchor[1]) if anchor else (len(lines), len(lines))
    start, end = found
    before, rest = lines[:start], lines[end:]
    while before and not before[-1].strip():
        before.pop()
    while rest and not rest[0].strip():
        rest.pop(0)
    return "\n".join(before + [""] * bool(before) + section + [""] * bool(rest) + rest) + "\n"


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(temporary, path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~umask)
        with os.fdopen(handle, "w") as out:
            out.write(text)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def write_section(path: Path, text: str, after: str | None = None) -> None:
    """Replace (or add) `text`'s section in the markdown file `path`, re-reading it right before writing."""
    path = Path(path)
    current = path.read_text() if path.exists() else EMPTY
    _write_atomic(path, replace_section(current, text, after))


def write_json(path: Path, data: Any) -> Path:
    """The raw numbers, as indented JSON (floats as Python prints them)."""
    path = Path(path)
    _write_atomic(path, json.dumps(data, indent=1) + "\n")
    return path
