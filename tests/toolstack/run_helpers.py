"""Helpers of the ``gntdma run`` tests: run the command in-process or as a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gntdma import cli


#: Environment of a subprocess run: temp files under ``tmp`` so a test sees all of them.
def subprocess_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"}
    env["TMPDIR"] = str(tmp)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def gntdma_cmd(*args: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from gntdma.cli import main; "
            "sys.exit(main())", *args]


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``gntdma ARGS`` in this process: (status, stdout, stderr)."""
    try:
        rc = cli.main(list(args))
    except SystemExit as e:  # argparse's own usage errors
        rc = int(e.code) if isinstance(e.code, int) else 2
    out, err = capsys.readouterr()
    return rc, out, err


def run_json(capsys: pytest.CaptureFixture[str], tmp: Path, *args: str
             ) -> tuple[int, dict[str, Any], str]:
    """Run with ``--json``: (status, the report, stderr)."""
    path = tmp / "report.json"
    rc, _out, err = run_cli(capsys, "run", *args, "--json", str(path))
    return rc, json.loads(path.read_text()) if path.exists() else {}, err


def write_cfg(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def spawn(tmp: Path, *args: str, cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(gntdma_cmd(*args), cwd=cwd, env=subprocess_env(tmp),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def phys_memory_mb() -> int:
    """This machine's memory, in MiB."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") >> 20
