"""The verbs of ``gntdma xl`` on a host, without a control socket.

Arguments are checked as Xen RELEASE-4.17.7's ``tools/xl`` checks them:
``SWITCH_FOREACH_OPT`` (xl_utils.h) calls ``def_getopt`` (xl_utils.c) with each
``main_*``'s required count (xl_block.c ``main_blockattach`` 2, ``main_blocklist``
1, ``main_blockdetach`` 2; xl_nic.c ``main_networkattach`` 1, ``main_networklist``
1, ``main_networkdetach`` 2; xl_vmcontrol.c ``main_destroy`` 1); too few prints
"'xl %s' requires at least %d argument%s." on stderr, ``help()`` (xl.c, the texts
of xl_cmdtable.c) on stdout, and exits 2.
"""

from __future__ import annotations

import os
import resource
from pathlib import Path

import pytest
from tests.toolstack.run_helpers import run_cli, write_cfg

from gntdma.host.image import DiskImage
from gntdma.toolstack.host import Host
from gntdma.toolstack.xlverbs import Console

#: Each verb and the arguments it requires (the table above).
_REQUIRED = {"block-attach": 2, "block-list": 1, "block-detach": 2, "network-attach": 1,
             "network-list": 1, "network-detach": 2, "destroy": 1}


def _console(host: Host) -> Console:
    return Console(host, log=lambda _line: None)


@pytest.mark.parametrize("verb", sorted(_REQUIRED))
def test_too_few_arguments_is_def_getopts_usage_exit_2(host: Host, verb: str) -> None:
    con = _console(host)
    n = _REQUIRED[verb]
    for args in (["g1", "xvdb"][:k] for k in range(n)):
        status, out, err = con.run(verb, args, "/")
        assert status == 2, (verb, args, status, out, err)
        assert err == f"'xl {verb}' requires at least {n} argument{'s' if n > 1 else ''}.\n\n"
        assert out.startswith("Usage: xl [-vtT") and f"] {verb} " in out.splitlines()[0]


def test_block_list_without_a_domain_is_usage_exit_2(host: Host) -> None:
    status, out, err = _console(host).run("block-list", [], "/")
    assert (status, err) == (2, "'xl block-list' requires at least 1 argument.\n\n")
    assert out == ("Usage: xl [-vtT] block-list <Domain(s)>\n\n"
                   "List virtual block devices for a domain.\n\n")


def test_help_and_unknown_options_are_def_getopts(host: Host) -> None:
    con = _console(host)
    status, out, err = con.run("destroy", ["-h"], "/")
    assert (status, err) == (0, "") and out.startswith(
        "Usage: xl [-vtTf] destroy [options] <Domain>\n\n\nTerminate a domain immediately.")
    assert con.run("block-list", ["-x", "0"], "/") == (2, "", "option `x' not supported.\n")
    # enough arguments: the verb runs (dom0 has no disk: the header alone)
    status, out, err = con.run("block-list", ["0"], "/")
    assert status == 0 and len(out.splitlines()) == 1 and err == ""


def test_failed_attach_removes_the_image_it_created(host: Host, tmp_path: Path) -> None:
    """DESIGN 11: what gntdma made for itself is removed when it fails."""
    con = _console(host)
    host.create_guest("g", memory_mb=16)
    # The image cannot be sized (EFBIG: a file size limit stands for a file system
    # that cannot hold 16T): the empty file it made goes.
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))
    try:
        status, _out, err = con.run("block-attach", ["g", "vdev=xvdz, size=16M, target=big.img"],
                                    str(tmp_path))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert status == 1 and "File too large" in err, err
    assert not (tmp_path / "big.img").exists()
    # The image is made, then the device cannot be added (xvda twice).
    assert con.run("block-attach", ["g", "vdev=xvda, size=1M, target=a.img"],
                   str(tmp_path))[0] == 0
    status, _out, err = con.run("block-attach", ["g", "vdev=xvda, size=1M, target=b.img"],
                                str(tmp_path))
    assert status == 1 and "libxl_device_disk_add failed." in err
    assert not (tmp_path / "b.img").exists()
    assert (tmp_path / "a.img").stat().st_size == 1 << 20
    assert con.release() is True


def test_failed_attach_keeps_an_image_that_was_there(host: Host, tmp_path: Path) -> None:
    con = _console(host)
    host.create_guest("g", memory_mb=16)
    DiskImage.create(tmp_path / "old.img", 1 << 20).close()
    (tmp_path / "empty.img").touch()
    for target, size in (("old.img", "2M"), ("empty.img", "1M")):
        status, _out, _err = con.run("block-attach", ["g", f"vdev=xvdb, size={size}, "
                                                           f"target={target}"], str(tmp_path))
        assert status == 1
    assert (tmp_path / "old.img").stat().st_size == 1 << 20
    assert (tmp_path / "empty.img").stat().st_size == 0
    assert sorted(os.listdir(tmp_path)) == ["empty.img", "old.img"]
    assert con.release() is True


@pytest.mark.parametrize("access", ["rw", "ro"])
def test_refused_run_leaves_no_image_it_made(capsys: pytest.CaptureFixture[str],
                                             tmp_path: Path, access: str) -> None:
    """``gntdma run`` whose new image cannot be sized (EFBIG) is refused with nothing
    left; size=16T is refused before anything is made (more than the free space)."""
    for size, limit in (("16M", 1 << 20), ("16T", None)):
        cfg = write_cfg(tmp_path / "g.cfg", "name = 'g'\nmemory = 16\nmax_grant_frames = 2\n"
                        f"disk = [ 'vdev=xvda, access={access}, size={size}, "
                        "target=big.img' ]\n")
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        if limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
        try:
            rc, _out, err = run_cli(capsys, "run", str(cfg), "--duration", "0.05")
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        assert rc == 2 and "disk xvda" in err, err
        assert sorted(os.listdir(tmp_path)) == ["g.cfg"], size
