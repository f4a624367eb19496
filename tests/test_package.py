"""The built wheel, installed into a fresh virtual environment, runs the Hydra app from an empty directory."""

from __future__ import annotations

import json
import site
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_installs_and_runs_from_an_empty_directory(tmp_path) -> None:
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(ROOT)], check=True,
                   capture_output=True, timeout=600)
    (wheel,) = dist.glob("m2n2_lightning-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    # The dependencies come from this environment (a .pth file), the package only from the wheel.
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    Path(purelib, "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], check=True, timeout=300)
    empty = tmp_path / "empty"
    empty.mkdir()
    for command in ([str(venv / "bin" / "m2n2-train")], [str(python), "-m", "m2n2_lightning"]):
        run_dir = empty / Path(command[-1]).name
        result = subprocess.run(
            [*command, "forward_passes=100", f"hydra.run.dir={run_dir}", "trainer.enable_progress_bar=false"],
            cwd=empty, capture_output=True, text=True, timeout=300,
        )
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["forward_passes"] == 100
        import_path = subprocess.run([str(python), "-c", "import m2n2_lightning; print(m2n2_lightning.__file__)"],
                                     cwd=empty, capture_output=True, text=True, check=True).stdout
        assert str(venv) in import_path  # the installed copy, not the checkout
    assert (ROOT / "LICENSE").exists()
