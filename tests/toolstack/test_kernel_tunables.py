"""The guest kernels' debugging switches from a config, the command line and the report.

``dma_debug`` and ``junk_fill`` set the guest kernel's tunables
``hw.busdma.dma_debug`` (Linux's ``dma_debug=off``, kernel/dma/debug.c,
dma_debug_cmdline) and ``vm.debug.divisor`` (FreeBSD sys/vm/uma_core.c,
dbg_divisor); ``--no-dma-debug`` and ``--no-junk`` turn them off in every guest
of ``gntdma run`` and ``gntdma serve``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from run_helpers import run_cli
from serve_helpers import serving, starved_config

from gntdma import cli
from gntdma.sys import KernelTunables
from gntdma.toolstack.domains import create_guest_from_config
from gntdma.toolstack.host import Host
from gntdma.toolstack.xlcfg import XlConfigError, debug_limited, parse_config


def test_dma_debug_and_junk_fill_keys_set_the_guest_kernel_tunables() -> None:
    on = parse_config('name = "a"\n')
    assert (on.dma_debug, on.junk_fill) == (True, True)
    assert on.kernel_tunables() == KernelTunables(dma_debug=True, junk_divisor=1)
    off = parse_config('name = "b"\ndma_debug = 0\njunk_fill = "0"\n')
    assert off.kernel_tunables() == KernelTunables(dma_debug=False, junk_divisor=0)
    assert off.line_of("dma_debug") == 2 and off.line_of("junk_fill") == 3
    host = Host()
    try:
        assert host.dom0.kernel.tunables == KernelTunables()  # a kernel booted without any
        for cfg, want in ((on, KernelTunables()), (off, KernelTunables(False, 0))):
            guest, vbds = create_guest_from_config(host, cfg)
            assert vbds == []
            assert guest.kernel.tunables == want
            assert guest.kernel.dma_debug.enabled is want.dma_debug
            host.destroy_guest(guest)
    finally:
        host.close()


@pytest.mark.parametrize("text,message", [
    ("dma_debug = 2", r"^t\.cfg:2: dma_debug must be 0 \(off\) or 1 \(on\), not 2$"),
    ("junk_fill = '-1'", r"^t\.cfg:2: junk_fill must be at least 0, not -1$"),
    ("junk_fill = 'yes'", r"^t\.cfg:2: junk_fill must be an integer, not the string 'yes'$"),
    ("dma_debug = [ 1 ]", r"^t\.cfg:2: dma_debug must be an integer, not a list$"),
    ("dma_debug = 1\ndma_debug = 0", r"^t\.cfg:3: dma_debug is already set on line 2$"),
])
def test_tunable_keys_refuse_other_values_with_file_and_line(text: str, message: str) -> None:
    with pytest.raises(XlConfigError, match=message):
        parse_config(f'name = "g"\n{text}\n', "t.cfg")


def test_command_line_turns_off_what_the_config_left_on() -> None:
    cfg = parse_config('name = "a"\njunk_fill = 0\n')
    assert debug_limited(cfg).kernel_tunables() == KernelTunables(True, 0)
    assert debug_limited(cfg, dma_debug=False).kernel_tunables() == KernelTunables(False, 0)
    assert debug_limited(cfg, junk_fill=True).junk_fill is False  # the config's off stays
    p = cli.build_parser()
    for cmd in (["run"], ["serve", "--nbd", "s"]):
        on = p.parse_args(cmd)
        assert (on.dma_debug, on.junk_fill) == (True, True)
        off = p.parse_args([*cmd, "--no-dma-debug", "--no-junk"])
        assert (off.dma_debug, off.junk_fill) == (False, False)


def _small(tmp: Path, name: str, extra: str = "") -> Path:
    cfg = tmp / f"{name}.cfg"
    cfg.write_text(f'name = "{name}"\nmemory = 32\nmax_grant_frames = 4\n{extra}'
                   f"disk = [ 'format=raw, vdev=xvda, access=rw, size=8M, "
                   f"target={name}.img' ]\n")
    return cfg


def test_run_with_dma_debug_and_junk_off_completes_and_reports_off(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = _small(tmp_path, "quiet", "dma_debug = 0\n")
    b = _small(tmp_path, "loud")
    out = tmp_path / "r.json"
    rc, text, _err = run_cli(capsys, "run", str(a), str(b), "--duration", "0.3",
                             "--threads", "2", "--no-junk", "--json", str(out))
    assert rc == 0, text
    data = json.loads(out.read_text())
    assert data["ok"] is True
    assert data["kernel_tunables"] == {
        "quiet": {"dma_debug": "off", "junk_fill": "off", "text": "dma-debug off, junk fill off",
                  "sysctls": {"hw.busdma.dma_debug": 0, "vm.debug.divisor": 0}},
        "loud": {"dma_debug": "on", "junk_fill": "off", "text": "dma-debug on, junk fill off",
                 "sysctls": {"hw.busdma.dma_debug": 1, "vm.debug.divisor": 0}}}
    lines = text.splitlines()
    assert "quiet: kernel dma-debug off, junk fill off" in lines  # progress, before the run
    assert "  kernel loud: dma-debug on, junk fill off" in lines  # summary


def test_default_run_reports_both_on(tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r.json"
    rc, text, _err = run_cli(capsys, "run", "--duration", "0.3", "--json", str(out))
    assert rc == 0, text
    figures = json.loads(out.read_text())["kernel_tunables"]
    assert [f["text"] for f in figures.values()] == ["dma-debug on, junk fill on"]


def test_serve_with_dma_debug_off_reports_off(tmp_path: Path) -> None:
    cfg = starved_config(tmp_path, size="8M")
    with serving(tmp_path, cfg, extra=("--no-dma-debug",)) as s:
        report = s.stop()
    assert s.status == 0, s.stderr
    assert report["kernel_tunables"]["starved"]["text"] == "dma-debug off, junk fill on"
    assert "starved: kernel dma-debug off, junk fill on" in s.lines
