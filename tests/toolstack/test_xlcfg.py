"""gntdma.toolstack.xlcfg: golden parses and every error, with its line."""

from __future__ import annotations

from pathlib import Path

import pytest

from gntdma.errors import ConfigError, GntdmaError
from gntdma.toolstack.xlcfg import (
    DiskSpec,
    GuestConfig,
    XlConfigError,
    load_config,
    parse_config,
    parse_disk_spec,
    parse_size,
    vdev_to_devid,
)
from gntdma.toolstack.xlvif import VifSpec

FULL = """\
# a guest for gntdma
name = "guest1"          # the domain's name
memory = 256
max_grant_frames = 4; max_maptrack_frames = 0x20
disk = [ '/var/lib/gntdma/a.img,raw,xvda,rw,size=64M',
         'format=raw, vdev=xvdb, access=ro, target=relative/b.img',
         # a comment inside the list
         "c.img,,xvdc,,no-discard",
       ]
vif = [ 'mac=00:16:3e:00:00:01,bridge=br0' ]
"""


def test_golden_full_config() -> None:
    cfg = parse_config(FULL, "guest1.cfg")
    assert cfg == GuestConfig(
        name="guest1", memory=256, max_grant_frames=4, max_maptrack_frames=32,
        disks=(
            DiskSpec(target="/var/lib/gntdma/a.img", vdev="xvda", devid=51712,
                     format="raw", access="rw", size=64 << 20, discard=True, line=5),
            DiskSpec(target="relative/b.img", vdev="xvdb", devid=51728, format="raw",
                     access="ro", size=None, discard=True, line=6),
            DiskSpec(target="c.img", vdev="xvdc", devid=51744, format="raw", access="rw",
                     size=None, discard=False, line=8),
        ),
        vifs=(VifSpec(mac="00:16:3e:00:00:01", bridge="br0", line=10,
                      text="mac=00:16:3e:00:00:01,bridge=br0"),), source="guest1.cfg")
    assert cfg.disks[1].readonly and not cfg.disks[0].readonly
    assert cfg.base_dir == Path(".")
    assert cfg.disks[0].path("/etc/gntdma") == Path("/var/lib/gntdma/a.img")
    assert cfg.disks[1].path("/etc/gntdma") == Path("/etc/gntdma/relative/b.img")


def test_defaults_and_minimal() -> None:
    cfg = parse_config("name='g'\n")
    assert cfg == GuestConfig(name="g", memory=64, max_grant_frames=64,
                              max_maptrack_frames=1024, disks=(), vifs=(), source="<string>")
    # no trailing newline, ';' separators, empty lists, quoted integers as xl accepts
    cfg = parse_config("name='g'; memory='32'; disk=[]; vif=[\n]")
    assert (cfg.memory, cfg.disks, cfg.vifs) == (32, (), ())


def test_strings_and_escapes() -> None:
    cfg = parse_config('name = "a\\"b\\\\c\\td"\n')
    assert cfg.name == 'a"b\\c\td'
    cfg = parse_config("name = 'x\\y'\n")
    assert cfg.name == "x\\y"  # single quotes take everything as written
    cfg = parse_config("name = 'a # not a comment'\n")
    assert cfg.name == "a # not a comment"


def test_load_config_from_file(tmp_path: Path) -> None:
    p = tmp_path / "g.cfg"
    p.write_text("name = 'g'\ndisk = ['d.img,,xvda,w,size=1M']\n")
    cfg = load_config(p)
    assert cfg.source == str(p) and cfg.base_dir == tmp_path
    assert cfg.disks[0].path(cfg.base_dir) == tmp_path / "d.img"
    assert cfg.disks[0].size == 1 << 20


# -- disk specifications ---------------------------------------------------------------


@pytest.mark.parametrize("spec", [
    "/dev/vg/guest-volume,,hda",
    "/dev/vg/guest-volume,raw,hda,rw",
    "format=raw, vdev=hda, access=rw, target=/dev/vg/guest-volume",
    "vdev=hda,/dev/vg/guest-volume",
    "format=raw,/dev/vg/guest-volume,hda",
    ",,hda,w,target=/dev/vg/guest-volume",
    "  /dev/vg/guest-volume ,  raw , hda , w  ",
    "/dev/vg/guest-volume,,hda,,direct-io-safe",
])
def test_equivalent_disk_specs(spec: str) -> None:
    """The equivalences of xl-disk-configuration(5)."""
    d = parse_disk_spec(spec)
    assert (d.target, d.format, d.vdev, d.devid, d.access) == (
        "/dev/vg/guest-volume", "raw", "hda", 3 << 8, "rw")


def test_target_keyword_takes_the_rest() -> None:
    d = parse_disk_spec("vdev=xvda, target=/odd,name=with,commas:and:colons ")
    assert d.target == "/odd,name=with,commas:and:colons "
    d = parse_disk_spec("vdev=xvda,target=phy:/dev/sdb")  # literal, not a prefix
    assert d.target == "phy:/dev/sdb"


def test_disk_flags_size_and_access() -> None:
    d = parse_disk_spec("a.img,,xvda,r,discard,size=4096")
    assert (d.access, d.discard, d.size) == ("ro", True, 4096)
    d = parse_disk_spec("no-discard,a.img,raw,xvda,ro")
    assert (d.access, d.discard) == ("ro", False)
    assert parse_disk_spec("a.img,,xvda,w").access == "rw"


@pytest.mark.parametrize(("vdev", "devid"), [
    ("xvda", 51712), ("xvdb", 51728), ("xvdp", (202 << 8) | (15 << 4)),
    ("xvda1", 51713), ("xvda15", 51727), ("xvdq", (1 << 28) | (16 << 8)),
    ("xvda16", (1 << 28) | 16), ("xvdtq37", (1 << 28) | (536 << 8) | 37),
    ("xvdaa", (1 << 28) | (26 << 8)), ("d0", 51712), ("d0p0", 51712), ("d1p2", 51730),
    ("d536p37", (1 << 28) | (536 << 8) | 37), ("sda", 8 << 8), ("sdb3", (8 << 8) | 19),
    ("hda", 3 << 8), ("hdb", (3 << 8) | 64), ("hdc2", (22 << 8) | 2),
    ("hdd63", (22 << 8) | 64 | 63), ("51712", 51712), ("0xca00", 51712),
])
def test_vdev_numbers(vdev: str, devid: int) -> None:
    assert vdev_to_devid(vdev) == devid


@pytest.mark.parametrize(("vdev", "why"), [
    ("xvda0", "not xvd"), ("xvda01", "not xvd"), ("xvdA", "not xvd"), ("sdq", "beyond"),
    ("sda16", "beyond"), ("hde", "beyond"), ("hda64", "beyond"), ("xvda256", "beyond"),
    ("floppy", "not xvd"), ("0", "out of range"), ("-5", "out of range"),
    ("d1048576", "beyond"),
])
def test_bad_vdevs(vdev: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        vdev_to_devid(vdev)


@pytest.mark.parametrize(("text", "n"), [
    ("512", 512), ("4096", 4096), ("64K", 64 << 10), ("64k", 64 << 10), ("64M", 64 << 20),
    ("1G", 1 << 30), ("2T", 2 << 40), ("1MiB", 1 << 20), ("8MB", 8 << 20), (" 16 M ", 16 << 20),
])
def test_sizes(text: str, n: int) -> None:
    assert parse_size(text) == n


@pytest.mark.parametrize(("text", "why"), [
    ("", "not a number"), ("M", "not a number"), ("1.5G", "not a number"),
    ("64X", "not a number"), ("-1M", "not a number"), ("0", "positive multiple"),
    ("1000", "positive multiple"), ("0M", "positive multiple"),
])
def test_bad_sizes(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_size(text)


@pytest.mark.parametrize(("spec", "why"), [
    (",,xvda", "no target"),
    ("vdev=xvda", "no target"),
    ("a.img", "no vdev"),
    ("a.img,raw", "no vdev"),
    ("a.img,qcow2,xvda", "format 'qcow2' is not supported"),
    ("a.img,,xvda,rwx", "access 'rwx' is not rw, w, ro or r"),
    ("a.img,,floppy", "vdev 'floppy' is not"),
    ("a.img,,sdz", "beyond"),
    ("a.img,,xvda,rw,extra", "too many positional parameters at 'extra'"),
    ("a.img,,xvda,rw,", "too many positional parameters"),
    ("a.img,,xvda,vdev=xvdb", "vdev given twice"),
    ("format=raw,format=raw,a.img,,xvda", "format given twice"),
    ("a.img,,xvda,colour=blue", "unknown parameter colour="),
    ("a.img,,xvda,devtype=cdrom", "devtype= is not supported: CD-ROM"),
    ("a.img,,xvda,cdrom", "cdrom is not supported"),
    ("a.img,,xvda,backendtype=qdisk", "backendtype= is not supported"),
    ("a.img,,xvda,script=block-iscsi", "script= is not supported"),
    ("a.img,,xvda,discard,no-discard", "given twice"),
    ("a.img,,xvda,size=12Q", "size '12Q'"),
    ("a.img,,xvda,size=100", "multiple of 512"),
    ("phy:/dev/sdb,,xvda", "deprecated prefix 'phy:'"),
    ("file:/a.img,,xvda", "deprecated prefix 'file:'"),
    ("a.img,,xvda,target=b.img", "target given twice"),
])
def test_bad_disk_specs(spec: str, why: str) -> None:
    with pytest.raises(XlConfigError) as ei:
        parse_disk_spec(spec, line=7, source="x.cfg")
    msg = str(ei.value)
    assert why in msg, msg
    assert msg.startswith(f"x.cfg:7: disk {spec!r}: ")
    assert ei.value.line == 7 and ei.value.source == "x.cfg"


def test_empty_positional_target_then_keyword_target() -> None:
    assert parse_disk_spec(",raw,xvda,w,target=b.img").target == "b.img"


# -- file errors ---------------------------------------------------------------------


@pytest.mark.parametrize(("text", "line", "why"), [
    ("name = 'g'\ncolour = 'blue'\n", 2, "unknown key 'colour'"),
    ("name = 'g'\nmemory = 1\nmemory = 2\n", 3, "memory is already set on line 2"),
    ("memory = 64\n", 0, "no name"),
    ("name = ''\n", 1, "name must not be empty"),
    ("name = 5\n", 1, "name must be a quoted string"),
    ("name = ['a']\n", 1, "name must be a quoted string"),
    ("name='g'\nmemory = 0\n", 2, "memory must be at least 1, not 0"),
    ("name='g'\nmemory = 'lots'\n", 2, "memory must be an integer, not the string 'lots'"),
    ("name='g'\nmemory = [1]\n", 2, "memory must be an integer, not a list"),
    ("name='g'\nmax_grant_frames = 0\n", 2, "max_grant_frames must be at least 1"),
    ("name='g'\n\nmax_maptrack_frames = '-1'\n", 3, "at least 0"),
    ("name='g'\ndisk = 'a.img,,xvda'\n", 2, "disk must be a list"),
    ("name='g'\ndisk = [\n  'a.img,,xvda',\n  42 ]\n", 4, "items of disk must be strings"),
    ("name='g'\nvif = 3\n", 2, "vif must be a list"),
    ("name='g'\ndisk = [\n'a.img,,xvda',\n\n'b.img,,d0']\n", 5,
     "vdev d0 is the same device as the disk on line 3"),
    ("name='g'\ndisk = ['a.img,,xvda', 'a.img,,xvdb']\n", 2,
     "target a.img is already the disk on line 2"),
    ("name='g'\ndisk = ['a.img,,xvda',\n 'b.img,qcow2,xvdb']\n", 3, "format 'qcow2'"),
    ("name = 'g\n", 1, "string not closed"),
    ('name = "g\n', 1, "string not closed"),
    ('name = "g', 1, "string not closed"),
    ('name = "a\\qb"\n', 1, "unknown escape '\\\\q'"),
    ("name 'g'\n", 1, "expected '=' after name, found the string 'g'"),
    ("name = \n", 1, "expected a value for name, found the end of the line"),
    ("name = ", 1, "expected a value for name, found the end of the file"),
    ("name = 'g' 'h'\n", 1, "expected the end of the line after the value of name"),
    ("name = 'g'\ndisk += ['a.img,,xvda']\n", 2, "'disk +=' is not supported"),
    ("= 'g'\n", 1, "expected a setting (KEY = VALUE), found '='"),
    ("name = 'g'\nmemory = 12abc\n", 2, "unexpected '12abc'"),
    ("name = 'g'\nmemory = @\n", 2, "unexpected '@'"),
    ("name='g'\ndisk = ['a.img,,xvda'\n", 2, "list of disk is not closed with ']'"),
    ("name='g'\ndisk = ['a.img,,xvda',\n", 2, "list of disk is not closed with ']'"),
    ("name='g'\ndisk = ['a.img,,xvda' 'b']\n", 2, "expected ',' or ']' in the list of disk"),
    ("name='g'\ndisk = [\n ['x']]\n", 3, "expected a value or ']' in the list of disk"),
    ("name='g'\ndisk = [,]\n", 2, "expected a value or ']'"),
])
def test_config_errors_name_the_line(text: str, line: int, why: str) -> None:
    with pytest.raises(XlConfigError) as ei:
        parse_config(text, "g.cfg")
    e = ei.value
    assert why in str(e), str(e)
    assert e.line == line
    assert str(e).startswith(f"g.cfg:{line}: " if line > 0 else "g.cfg: ")
    assert isinstance(e, ConfigError) and isinstance(e, GntdmaError)


def test_load_config_errors(tmp_path: Path) -> None:
    with pytest.raises(XlConfigError, match="cannot read the configuration"):
        load_config(tmp_path / "missing.cfg")
    bad = tmp_path / "bad.cfg"
    bad.write_bytes(b"name = '\xff'\n")
    with pytest.raises(XlConfigError, match="not UTF-8"):
        load_config(bad)
    wrong = tmp_path / "wrong.cfg"
    wrong.write_text("name = 'g'\n\nmemory = -3\n")
    with pytest.raises(XlConfigError) as ei:
        load_config(wrong)
    assert str(ei.value).startswith(f"{wrong}:3: ")
