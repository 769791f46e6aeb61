"""The wheel carries the configs, so the installed `rlx` works outside the repository."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_listed_in_pyproject():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "rlx").rglob("__init__.py")} | {
        "rlx.conf"
    }
    assert on_disk == listed


def test_wheel_contains_every_yaml(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        check=True,
        capture_output=True,
    )
    wheel = next(tmp_path.glob("rlx-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"rlx/conf/{p.relative_to(REPO / 'conf')}" for p in (REPO / "conf").rglob("*.yaml")}
    assert shipped and shipped <= names
    assert "rlx/conf/train.yaml" in names and "rlx/conf/algo/grpo.yaml" in names
