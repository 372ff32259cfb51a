"""xl.cfg-style guest configuration files, for the keys gntdma uses.

The syntax is the one ``xl`` reads (libxlu): ``KEY = VALUE`` settings, one per
line or separated by ``;``; values are integers (decimal or ``0x`` hex),
strings in ``'single'`` (taken as written) or ``"double"`` quotes (C escapes
``\\\\ \\" \\' \\n \\t``), or ``[ lists, of, values ]`` that may span lines and
end with a comma; ``#`` starts a comment. The keys:

===================== ======= ========================================================
key                   type    meaning
===================== ======= ========================================================
``name``              string  the domain's name (required)
``memory``            integer MiB of guest memory (default 64)
``max_grant_frames``  integer grant-table frames the guest may grow to, 1 to 64 (default 64)
``max_maptrack_frames`` integer maptrack frames, 0 to 1024 (default 1024)
``disk``              list    disk specifications (below)
``vif``               list    network interfaces (:mod:`gntdma.toolstack.xlvif`)
``dma_debug``         0 or 1  the guest kernel's DMA-API debugging (default 1, on)
``junk_fill``         0 or 1  the guest kernel fills freed memory with junk (default 1, on)
===================== ======= ========================================================

``dma_debug`` and ``junk_fill`` are gntdma's: the guest kernel's tunables
``hw.busdma.dma_debug`` and ``vm.debug.divisor`` (:mod:`gntdma.sys._tunables`);
off, a guest runs faster and checks less.

The limits of the two grant-table keys are Xen 4.17's: ``grant_table_init``
(``xen/common/grant_table.c``) refuses a domain with fewer than one or more
than ``gnttab_max_frames`` (64) grant frames, or more than
``gnttab_max_maptrack_frames`` (1024) maptrack frames. Other keys ``xl``
knows (``builder``, ``vcpus``, ``on_crash``, ...) are accepted, as ``xl``
would, with a note that gntdma does not use them; an unknown key is an error
(most often a misspelling).

A disk specification is the xl disk syntax (``xl-disk-configuration(5)``): a
comma-separated mix of positional parameters ``target, format, vdev, access``
(each assigned to the first of those not yet given; empty means the default)
and ``key=value`` parameters ``target=``, ``format=``, ``vdev=``, ``access=``;
``target=`` takes the whole rest of the specification, commas included, so it
comes last. ``format`` must be ``raw``; ``access`` is ``rw``/``w`` (default) or
``ro``/``r``; ``vdev`` is ``xvd*``, ``sd*``, ``hd*``, ``d<N>[p<M>]`` or a number,
and gives the xenstore device id (``docs/misc/vbd-interface.txt``). The flags
``discard`` and ``no-discard`` choose whether the backend offers discard. One
gntdma extension: ``size=64M`` (bytes, or ``K``/``M``/``G``/``T`` binary units; a
whole number of 512-byte sectors) creates the image sparse at that size if it
does not exist. Everything else xl knows (``devtype=cdrom``, ``backendtype=``,
``script=``, deprecated prefixes such as ``phy:``) is refused with an error.

Every error is an :class:`XlConfigError` (a :class:`gntdma.errors.ConfigError`)
naming the file and line, and what is wrong there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Final, final

from gntdma.errors import ConfigError
from gntdma.sys import KernelTunables
from gntdma.toolstack.xlvif import VifSpec, VifSpecError, parse_vif_spec, vif_clash

__all__ = [
    "DEFAULT_MAX_GRANT_FRAMES",
    "DEFAULT_MAX_MAPTRACK_FRAMES",
    "DEFAULT_MEMORY_MB",
    "XEN_MAX_GRANT_FRAMES",
    "XEN_MAX_MAPTRACK_FRAMES",
    "XL_UNUSED_KEYS",
    "DiskSpec",
    "GuestConfig",
    "XlConfigError",
    "debug_limited",
    "load_config",
    "parse_config",
    "parse_disk_spec",
    "parse_size",
    "vdev_to_devid",
]

DEFAULT_MEMORY_MB: Final = 64
DEFAULT_MAX_GRANT_FRAMES: Final = 64
DEFAULT_MAX_MAPTRACK_FRAMES: Final = 1024
#: Xen 4.17's ``opt_max_grant_frames`` and ``opt_max_maptrack_frames`` defaults.
XEN_MAX_GRANT_FRAMES: Final = 64
XEN_MAX_MAPTRACK_FRAMES: Final = 1024
#: Keys of xl.cfg(5) that gntdma accepts and does not use.
XL_UNUSED_KEYS: Final = frozenset({
    "builder", "type", "vcpus", "maxvcpus", "cpus", "cpus_soft", "cpu_weight", "cap",
    "maxmem", "vnuma", "on_poweroff", "on_reboot", "on_watchdog", "on_crash",
    "on_soft_reset", "kernel", "ramdisk", "cmdline", "root", "extra", "bootloader",
    "bootloader_args", "uuid", "pool", "seclabel", "init_seclabel", "driver_domain",
    "device_model_version", "device_model_override", "device_model_stubdomain_override",
    "vfb", "vkb", "vtpm", "p9", "pvcalls", "channel", "pci", "dtdev", "usbctrl", "usbdev",
    "serial", "boot", "acpi", "apic", "pae", "hap", "nestedhvm", "viridian", "localtime",
    "rtc_timeoffset", "videoram", "vga", "stdvga", "sdl", "vnc", "vnclisten", "vncdisplay",
    "vncpasswd", "keymap", "soundhw", "usb", "usbdevice", "shadow_memory", "tsc_mode",
    "gfx_passthru", "iomem", "ioports", "irqs", "max_event_channels", "e820_host",
    "claim_mode", "nomigrate", "altp2m", "xen_platform_pci", "passthrough", "timer_mode",
    "vdispl", "vsnd", "trap_unmapped_accesses", "device_tree", "gic_version", "nr_spis",
    "event_channels", "max_grant_version", "vcpu_hard_affinity", "vcpu_soft_affinity",
    "firmware", "bios", "hdtype", "device_model_args", "device_model_user", "pvshim",
    "pvshim_path", "pvshim_cmdline", "pvshim_extra", "rdm", "rdm_mem_boundary",
    "mca_caps", "msitranslate", "pci_permissive", "pci_power_mgmt", "vif2", "vscsi",
})
_SECTOR: Final = 512


class XlConfigError(ConfigError):
    """A configuration file is wrong at ``source:line``."""

    def __init__(self, source: str, line: int, message: str) -> None:
        self.source = source
        self.line = line
        self.problem = message
        where = f"{source}:{line}" if line > 0 else source
        super().__init__(f"{where}: {message}")


@final
@dataclass(frozen=True, slots=True)
class DiskSpec:
    """One ``disk = [...]`` entry."""

    target: str  #: the image path as written (relative paths: see :meth:`path`)
    vdev: str  #: the virtual device name as written, e.g. ``xvda``
    devid: int  #: the xenstore device id of ``vdev`` (51712 for xvda)
    format: str = "raw"
    access: str = "rw"  #: ``rw`` or ``ro``
    size: int | None = None  #: bytes, to create the image at (gntdma's ``size=``)
    discard: bool = True  #: offer discard to the frontend
    line: int = 0  #: where it was written

    @property
    def readonly(self) -> bool:
        return self.access == "ro"

    def path(self, base: str | Path) -> Path:
        """The image path, a relative target taken from ``base`` (the config's folder)."""
        p = Path(self.target)
        return p if p.is_absolute() else Path(base) / p


@final
@dataclass(frozen=True, slots=True)
class GuestConfig:
    """A guest as a configuration file describes it."""

    name: str
    memory: int = DEFAULT_MEMORY_MB  #: MiB
    max_grant_frames: int = DEFAULT_MAX_GRANT_FRAMES
    max_maptrack_frames: int = DEFAULT_MAX_MAPTRACK_FRAMES
    disks: tuple[DiskSpec, ...] = ()
    vifs: tuple[VifSpec, ...] = ()
    dma_debug: bool = True  #: the kernel's DMA-API debugging
    junk_fill: bool = True  #: the kernel's junk fill on free
    source: str = "<string>"  #: the file it came from
    #: ``file:line: note: ...`` for what is accepted and ignored (xl keys, vif)
    notes: tuple[str, ...] = ()
    #: (key, line) of every setting
    lines: tuple[tuple[str, int], ...] = field(default=(), compare=False)

    def line_of(self, key: str) -> int:
        """The line ``key`` is set on, or 0 (not set: its default)."""
        return next((line for k, line in self.lines if k == key), 0)

    def kernel_tunables(self) -> KernelTunables:
        """The guest kernel's tunables (``dma_debug``, ``junk_fill``)."""
        return KernelTunables(dma_debug=self.dma_debug, junk_divisor=int(self.junk_fill))

    @property
    def base_dir(self) -> Path:
        """Where relative disk targets are taken from (the file's folder, or cwd)."""
        return Path(self.source).parent if self.source != "<string>" else Path(".")


# -- sizes and vdevs -------------------------------------------------------------------

_SIZE: Final = re.compile(r"(?P<n>[0-9]+)\s*(?P<unit>[kmgt]?)(?:i?b)?", re.IGNORECASE)
_UNITS: Final = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """Bytes in ``text``: ``4096``, ``64K``, ``64M``, ``1G``, ``2T`` (binary units;
    ``KiB``/``MB`` spellings too). Must be a positive whole number of 512-byte sectors.

    Raises:
        ValueError: says what is wrong.
    """
    m = _SIZE.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"size {text!r} is not a number with an optional K, M, G or T")
    n = int(m["n"]) * _UNITS[m["unit"].lower()]
    if n <= 0 or n % _SECTOR != 0:
        raise ValueError(f"size {text!r} is not a positive multiple of {_SECTOR} bytes")
    return n


_VDEV_NAME: Final = re.compile(r"(?P<kind>xvd|sd|hd)(?P<disk>[a-z]+)(?P<part>[1-9][0-9]*)?")
_VDEV_DP: Final = re.compile(r"d(?P<disk>0|[1-9][0-9]*)(?:p(?P<part>0|[1-9][0-9]*))?")


def _letters(s: str) -> int:
    """Disk index of ``a``.. ``z``, ``aa``..: bijective base 26, from 0."""
    n = 0
    for c in s:
        n = n * 26 + (ord(c) - ord("a") + 1)
    return n - 1


def vdev_to_devid(vdev: str) -> int:
    """The xenstore device id of a vdev name (``docs/misc/vbd-interface.txt``).

    Raises:
        ValueError: not a vdev this scheme can encode.
    """
    v = vdev.strip()
    m = _VDEV_NAME.fullmatch(v)
    dp = _VDEV_DP.fullmatch(v)
    if m is not None or dp is not None:
        if m is not None:
            kind, disk = m["kind"], _letters(m["disk"])
            part = int(m["part"]) if m["part"] is not None else 0
        else:
            assert dp is not None
            kind, disk = "xvd", int(dp["disk"])
            part = int(dp["part"]) if dp["part"] is not None else 0
        if kind == "xvd":
            if disk < 16 and part < 16:
                return (202 << 8) | (disk << 4) | part
            if disk < 1 << 20 and part < 256:
                return (1 << 28) | (disk << 8) | part
        elif kind == "sd":
            if disk < 16 and part < 16:
                return (8 << 8) | (disk << 4) | part
        elif disk < 4 and part < 64:  # hd
            return ((3 << 8) | (disk << 6) | part if disk < 2
                    else (22 << 8) | ((disk - 2) << 6) | part)
        raise ValueError(f"vdev {vdev!r}: disk {disk} partition {part} is beyond what "
                         f"{kind} names can encode")
    try:
        n = int(v, 0)
    except ValueError:
        raise ValueError(f"vdev {vdev!r} is not xvd*, sd*, hd*, d<N>[p<M>] or a "
                         f"number") from None
    if not 0 < n < 1 << 31:
        raise ValueError(f"vdev number {vdev!r} is out of range")
    return n


# -- disk specifications ----------------------------------------------------------------

_POSITIONAL: Final = ("target", "format", "vdev", "access")
_ACCESS: Final = {"rw": "rw", "w": "rw", "ro": "ro", "r": "ro"}
_DEPRECATED_PREFIXES: Final = ("raw", "qcow", "qcow2", "vhd", "tap", "tap2", "tapdisk",
                               "aio", "ioemu", "file", "phy", "iscsi", "nbd", "enbd", "drbd")
_UNSUPPORTED: Final = {
    "devtype": "CD-ROM devices are not supported",
    "cdrom": "CD-ROM devices are not supported",
    "backendtype": "gntdma has one backend (blkback on an image file)",
    "backend": "backend domains other than dom0 are not supported",
    "script": "hotplug scripts are not supported",
    "colo": "COLO is not supported",
}


def parse_disk_spec(spec: str, *, line: int = 0, source: str = "<string>") -> DiskSpec:
    """Parse one disk specification (one element of ``disk = [...]``).

    Raises:
        XlConfigError: naming ``source:line`` and the problem.
    """

    def fail(msg: str) -> XlConfigError:
        return XlConfigError(source, line, f"disk {spec!r}: {msg}")

    values: dict[str, str] = {}
    discard = True
    seen_discard_flag = False
    positional_target = False
    rest = spec
    while True:
        param, sep, tail = rest.partition(",")
        p = param.lstrip()
        key, eq, value = p.partition("=")
        key = key.strip()
        if eq and key == "target":
            # target= swallows the rest of the specification, commas and all
            value = p.partition("=")[2] + sep + tail
            if "target" in values and values["target"] != "":
                raise fail("target given twice")
            values["target"] = value
            positional_target = False
            break
        if eq:
            value = value.strip()
            if key in _UNSUPPORTED:
                raise fail(f"{key}= is not supported: {_UNSUPPORTED[key]}")
            if key not in ("format", "vdev", "access", "size"):
                raise fail(f"unknown parameter {key}=")
            if key in values:
                raise fail(f"{key} given twice")
            values[key] = value
        elif p.strip() in ("discard", "no-discard"):
            if seen_discard_flag:
                raise fail("discard or no-discard given twice")
            seen_discard_flag = True
            discard = p.strip() == "discard"
        elif p.strip() == "direct-io-safe":
            pass  # advice for qemu's backend; nothing to do here
        elif p.strip() in _UNSUPPORTED:
            raise fail(f"{p.strip()} is not supported: {_UNSUPPORTED[p.strip()]}")
        else:
            slot = next((k for k in _POSITIONAL if k not in values), None)
            if slot is None:
                raise fail(f"too many positional parameters at {p.strip()!r} (target, "
                           f"format, vdev and access are given; is it a misspelt flag?)")
            values[slot] = p.strip()
            if slot == "target":
                positional_target = True
        if not sep:
            break
        rest = tail

    target = values.get("target", "")
    if target.strip() == "":
        raise fail("no target: give the image path (positionally or as target=)")
    if positional_target and ":" in target.split("/", 1)[0]:
        prefix = target.split(":", 1)[0]
        if prefix in _DEPRECATED_PREFIXES:
            raise fail(f"the deprecated prefix '{prefix}:' is not supported; write the "
                       f"path alone (and format=raw)")
    fmt = values.get("format", "") or "raw"
    if fmt != "raw":
        raise fail(f"format {fmt!r} is not supported: gntdma serves raw images")
    vdev = values.get("vdev", "")
    if vdev == "":
        raise fail("no vdev (the guest's name for the disk, e.g. xvda)")
    try:
        devid = vdev_to_devid(vdev)
    except ValueError as e:
        raise fail(str(e)) from None
    access_in = values.get("access", "") or "rw"
    access = _ACCESS.get(access_in)
    if access is None:
        raise fail(f"access {access_in!r} is not rw, w, ro or r")
    size: int | None = None
    if values.get("size", "") != "":
        try:
            size = parse_size(values["size"])
        except ValueError as e:
            raise fail(str(e)) from None
    return DiskSpec(target=target, vdev=vdev, devid=devid, format=fmt, access=access,
                    size=size, discard=discard, line=line)


# -- the file ---------------------------------------------------------------------------

_IDENT: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NUMBER: Final = re.compile(r"0[xX][0-9a-fA-F]+|[0-9]+")
_ESCAPES: Final = {"\\": "\\", '"': '"', "'": "'", "n": "\n", "t": "\t", "r": "\r",
                   "a": "\a", "b": "\b", "f": "\f", "v": "\v", "0": "\0"}


@dataclass(frozen=True, slots=True)
class _Tok:
    kind: str  # ident, int, str, '=', '+=', '[', ']', ',', ';', nl, eof
    value: str | int
    line: int


def _lex(text: str, source: str) -> list[_Tok]:
    toks: list[_Tok] = []
    i, line, n = 0, 1, len(text)
    while i < n:
        c = text[i]
        if c == "\n":
            toks.append(_Tok("nl", "", line))
            line += 1
            i += 1
        elif c in " \t\r":
            i += 1
        elif c == "#":
            while i < n and text[i] != "\n":
                i += 1
        elif c in "=[],;":
            toks.append(_Tok(c, c, line))
            i += 1
        elif text.startswith("+=", i):
            toks.append(_Tok("+=", "+=", line))
            i += 2
        elif c == "'":
            end = text.find("'", i + 1)
            nl = text.find("\n", i + 1)
            if end < 0 or (0 <= nl < end):
                raise XlConfigError(source, line, "string not closed before the end of "
                                    "the line")
            toks.append(_Tok("str", text[i + 1:end], line))
            i = end + 1
        elif c == '"':
            out: list[str] = []
            j = i + 1
            while True:
                if j >= n or text[j] == "\n":
                    raise XlConfigError(source, line, "string not closed before the end "
                                        "of the line")
                if text[j] == '"':
                    break
                if text[j] == "\\":
                    if j + 1 >= n or text[j + 1] not in _ESCAPES:
                        esc = text[j:j + 2].strip() or "\\"
                        raise XlConfigError(source, line, f"unknown escape {esc!r} in a "
                                            f"string")
                    out.append(_ESCAPES[text[j + 1]])
                    j += 2
                    continue
                out.append(text[j])
                j += 1
            toks.append(_Tok("str", "".join(out), line))
            i = j + 1
        else:
            m = _NUMBER.match(text, i)
            if m is not None and not (m.end() < n and (text[m.end()].isalnum()
                                                       or text[m.end()] == "_")):
                toks.append(_Tok("int", int(m.group(), 0), line))
                i = m.end()
                continue
            m = _IDENT.match(text, i)
            if m is not None:
                toks.append(_Tok("ident", m.group(), line))
                i = m.end()
                continue
            bad = re.match(r"\S+", text[i:])
            word = bad.group() if bad is not None else c
            raise XlConfigError(source, line, f"unexpected {word!r}: values are numbers, "
                                "quoted strings or [lists]")
    toks.append(_Tok("eof", "", line))
    return toks


Value = int | str | list[tuple[int | str, int]]


def _describe(t: _Tok) -> str:
    if t.kind == "nl":
        return "the end of the line"
    if t.kind == "eof":
        return "the end of the file"
    if t.kind == "str":
        return f"the string {t.value!r}"
    return repr(t.value)


def _parse(text: str, source: str) -> list[tuple[str, int, Value]]:
    """The settings of a file: (key, line, value); list items carry their own line."""
    toks = _lex(text, source)
    pos = 0
    out: list[tuple[str, int, Value]] = []

    def peek() -> _Tok:
        return toks[pos]

    def fail(t: _Tok, msg: str) -> XlConfigError:
        return XlConfigError(source, t.line, msg)

    while True:
        t = peek()
        if t.kind in ("nl", ";"):
            pos += 1
            continue
        if t.kind == "eof":
            return out
        if t.kind != "ident":
            raise fail(t, f"expected a setting (KEY = VALUE), found {_describe(t)}")
        key = str(t.value)
        pos += 1
        op = peek()
        if op.kind == "+=":
            raise fail(op, f"'{key} +=' is not supported: give the whole value with '='")
        if op.kind != "=":
            raise fail(op, f"expected '=' after {key}, found {_describe(op)}")
        pos += 1
        v = peek()
        value: Value
        if v.kind in ("int", "str"):
            value = v.value
            pos += 1
        elif v.kind == "[":
            pos += 1
            items: list[tuple[int | str, int]] = []
            while True:
                while peek().kind == "nl":
                    pos += 1
                it = peek()
                if it.kind == "]":
                    pos += 1
                    break
                if it.kind not in ("int", "str"):
                    if it.kind == "eof":
                        raise fail(v, f"list of {key} is not closed with ']'")
                    raise fail(it, f"expected a value or ']' in the list of {key}, found "
                               f"{_describe(it)}")
                items.append((it.value, it.line))
                pos += 1
                while peek().kind == "nl":
                    pos += 1
                sep = peek()
                if sep.kind == ",":
                    pos += 1
                    continue
                if sep.kind == "]":
                    pos += 1
                    break
                if sep.kind == "eof":
                    raise fail(v, f"list of {key} is not closed with ']'")
                raise fail(sep, f"expected ',' or ']' in the list of {key}, found "
                           f"{_describe(sep)}")
            value = items
        else:
            raise fail(v, f"expected a value for {key}, found {_describe(v)}")
        end = peek()
        if end.kind not in ("nl", ";", "eof"):
            raise fail(end, f"expected the end of the line after the value of {key}, found "
                       f"{_describe(end)}")
        out.append((key, t.line, value))


def _int_value(source: str, key: str, line: int, value: Value, minimum: int,
               maximum: int | None = None) -> int:
    if isinstance(value, str):  # libxlu keeps every value as a string: '512' is 512
        try:
            value = int(value.strip(), 0)
        except ValueError:
            raise XlConfigError(source, line, f"{key} must be an integer, not the string "
                                f"{value!r}") from None
    if isinstance(value, list):
        raise XlConfigError(source, line, f"{key} must be an integer, not a list")
    if value < minimum:
        raise XlConfigError(source, line, f"{key} must be at least {minimum}, not {value}")
    if maximum is not None and value > maximum:
        raise XlConfigError(source, line, f"{key} must be at most {maximum} (Xen's limit), "
                            f"not {value}")
    return value


def _str_list(source: str, key: str, line: int, value: Value) -> list[tuple[str, int]]:
    if not isinstance(value, list):
        raise XlConfigError(source, line, f"{key} must be a list: {key} = [ '...', ... ]")
    out: list[tuple[str, int]] = []
    for item, item_line in value:
        if not isinstance(item, str):
            raise XlConfigError(source, item_line, f"the items of {key} must be strings, "
                                f"not {item!r}")
        out.append((item, item_line))
    return out


_KEYS: Final = ("name", "memory", "max_grant_frames", "max_maptrack_frames", "disk", "vif",
                 "dma_debug", "junk_fill")


def parse_config(text: str, source: str = "<string>") -> GuestConfig:
    """Parse the text of a configuration file.

    Raises:
        XlConfigError: at the first problem, naming ``source:line``.
    """
    seen: dict[str, int] = {}
    notes: list[str] = []
    name: str | None = None
    memory = DEFAULT_MEMORY_MB
    grant_frames = DEFAULT_MAX_GRANT_FRAMES
    maptrack_frames = DEFAULT_MAX_MAPTRACK_FRAMES
    disks: list[DiskSpec] = []
    vifs: list[VifSpec] = []
    switches = {"dma_debug": True, "junk_fill": True}
    for key, line, value in _parse(text, source):
        if key in seen:
            raise XlConfigError(source, line, f"{key} is already set on line {seen[key]}")
        seen[key] = line
        if key in XL_UNUSED_KEYS:
            notes.append(f"{source}:{line}: note: {key} is an xl key gntdma does not use "
                         "(ignored)")
            continue
        if key not in _KEYS:
            raise XlConfigError(source, line, f"unknown key {key!r} (gntdma knows "
                                f"{', '.join(_KEYS)}, and ignores the other xl keys)")
        if key == "name":
            if not isinstance(value, str):
                raise XlConfigError(source, line, "name must be a quoted string")
            if value.strip() == "":
                raise XlConfigError(source, line, "name must not be empty")
            name = value
        elif key == "memory":
            memory = _int_value(source, key, line, value, 1)
        elif key == "max_grant_frames":
            grant_frames = _int_value(source, key, line, value, 1, XEN_MAX_GRANT_FRAMES)
        elif key == "max_maptrack_frames":
            maptrack_frames = _int_value(source, key, line, value, 0,
                                         XEN_MAX_MAPTRACK_FRAMES)
        elif key in switches:
            if _int_value(source, key, line, value, 0) > 1:
                raise XlConfigError(source, line, f"{key} must be 0 (off) or 1 (on), not "
                                    f"{value}")
            switches[key] = _int_value(source, key, line, value, 0) == 1
        elif key == "disk":
            by_vdev: dict[int, DiskSpec] = {}
            by_target: dict[str, DiskSpec] = {}
            for item, item_line in _str_list(source, key, line, value):
                d = parse_disk_spec(item, line=item_line, source=source)
                other = by_vdev.get(d.devid)
                if other is not None:
                    raise XlConfigError(source, item_line, f"disk {item!r}: vdev {d.vdev} "
                                        f"is the same device as the disk on line "
                                        f"{other.line}")
                other = by_target.get(d.target)
                if other is not None:
                    raise XlConfigError(source, item_line, f"disk {item!r}: target "
                                        f"{d.target} is already the disk on line "
                                        f"{other.line}")
                by_vdev[d.devid] = by_target[d.target] = d
                disks.append(d)
        else:  # vif
            for item, item_line in _str_list(source, key, line, value):
                try:
                    v = parse_vif_spec(item, line=item_line)
                except VifSpecError as e:
                    raise XlConfigError(source, item_line, f"vif {item!r}: {e}") from None
                clash = vif_clash(v, vifs)
                if clash is not None:
                    raise XlConfigError(source, item_line, f"vif {item!r}: {clash}")
                notes.extend(f"{source}:{item_line}: note: vif: {n}" for n in v.notes)
                vifs.append(v)
    if name is None:
        raise XlConfigError(source, 0, "no name: every guest needs name = '...'")
    return GuestConfig(name=name, memory=memory, max_grant_frames=grant_frames,
                       max_maptrack_frames=maptrack_frames, disks=tuple(disks),
                       vifs=tuple(vifs), dma_debug=switches["dma_debug"],
                       junk_fill=switches["junk_fill"], source=source, notes=tuple(notes),
                       lines=tuple(seen.items()))


def debug_limited(cfg: GuestConfig, *, dma_debug: bool = True,
                  junk_fill: bool = True) -> GuestConfig:
    """``cfg`` with DMA-API debugging or junk fill turned off when the command line
    says so (``--no-dma-debug``, ``--no-junk``); what the config turned off stays off."""
    return replace(cfg, dma_debug=cfg.dma_debug and dma_debug,
                   junk_fill=cfg.junk_fill and junk_fill)


def load_config(path: str | Path) -> GuestConfig:
    """Read and parse a configuration file.

    Raises:
        XlConfigError: the file cannot be read, is not UTF-8, or is wrong.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise XlConfigError(str(p), 0, f"cannot read the configuration: "
                            f"{e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise XlConfigError(str(p), 0, f"not UTF-8 text: {e.reason} at byte "
                            f"{e.start}") from None
    return parse_config(text, str(p))
