"""``gntdma serve`` options refused up front (status 2), before anything is built."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.toolstack.run_helpers import run_cli

from gntdma.errors import ConfigError
from gntdma.toolstack.serve import parse_listen


def test_non_loopback_listen_address_refused_without_allow_remote(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rc, _out, err = run_cli(capsys, "serve", "--nbd-listen", "0.0.0.0:10809")
    assert rc == 2 and "no authentication" in err
    with pytest.raises(ConfigError):
        parse_listen("10.1.2.3:10809", False)
    host, port, warning = parse_listen("10.1.2.3:10809", True)
    assert (host, port) == ("10.1.2.3", 10809) and warning is not None
    assert parse_listen("[::1]:0", False) == ("::1", 0, None)


def test_exactly_one_of_nbd_and_nbd_listen(capsys: pytest.CaptureFixture[str],
                                           tmp_path: Path) -> None:
    assert run_cli(capsys, "serve")[0] == 2
    rc, _o, err = run_cli(capsys, "serve", "--nbd", str(tmp_path / "s"),
                          "--nbd-listen", "127.0.0.1:0")
    assert rc == 2 and "exactly one" in err


def test_existing_socket_path_refused(capsys: pytest.CaptureFixture[str],
                                      tmp_path: Path) -> None:
    there = tmp_path / "sock"
    there.write_text("mine")
    rc, _o, err = run_cli(capsys, "serve", "--nbd", str(there))
    assert rc == 2 and "exists" in err and there.read_text() == "mine"


@pytest.mark.parametrize("args,what", [
    (("--nbd-max-connections", "0"), "--nbd-max-connections"),
    (("--nbd-handshake-timeout", "-1"), "--nbd-handshake-timeout"),
    (("--nbd-handshake-timeout", "nan"), "--nbd-handshake-timeout"),
])
def test_connection_limit_and_handshake_timeout_out_of_range_refused(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, args: tuple[str, ...],
        what: str) -> None:
    rc, _o, err = run_cli(capsys, "serve", "--nbd", str(tmp_path / "s"), *args)
    assert rc == 2 and what in err and not (tmp_path / "s").exists()
