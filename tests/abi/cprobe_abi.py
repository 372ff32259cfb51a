"""Compile C probes against Debian's libxen-dev headers and read their answers.

Used by ``test_c_layout.py`` and ``test_ring_c.py``. Nothing here skips: a missing
``gcc`` or missing headers is a test failure (``make test`` installs both).

Two ways to get numbers out of C:

- native (x86_64): build and run the probe; it prints its table.
- x86_32: ``gcc -m32`` can compile but not link here (no 32-bit libc), so the
  probe is compiled to assembly (``-S -ffreestanding``) and the bytes of its
  initialised ``const`` objects are read back from the data directives.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

XEN_INCLUDE = Path("/usr/include/xen")

#: Headers every probe includes, in this order.
HEADERS = (
    "stdint.h",
    "stddef.h",
    "xen/xen.h",
    "xen/grant_table.h",
    "xen/event_channel.h",
    "xen/io/ring.h",
    "xen/io/blkif.h",
    "xen/io/protocols.h",
)

#: The latest interface (``__XEN_TOOLS__``): without it the headers give the legacy
#: (0x00000000) interface, where e.g. ``GNTTABOP_set_version`` does not exist.
CFLAGS = ("-D__XEN_TOOLS__", "-std=gnu11", "-O0", "-Wall", "-Werror")
M32_FLAGS = ("-m32", "-ffreestanding")


def require_toolchain() -> str:
    """The path of gcc; fails (never skips) if gcc or the Xen headers are missing."""
    gcc = shutil.which("gcc")
    assert gcc is not None, "gcc not found: `make test` installs it (Debian package gcc)"
    for h in ("grant_table.h", "event_channel.h", "io/ring.h", "io/blkif.h"):
        assert (XEN_INCLUDE / h).is_file(), (
            f"{XEN_INCLUDE / h} missing: `make test` installs Debian's libxen-dev"
        )
    return gcc


def run(cmd: Sequence[str], stdin: str | None = None) -> str:
    """Run ``cmd``; on failure show its stderr in the assertion."""
    p = subprocess.run(list(cmd), input=stdin, capture_output=True, text=True, check=False,
                       timeout=120)
    assert p.returncode == 0, f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr}{p.stdout}"
    return p.stdout


def includes() -> str:
    return "".join(f"#include <{h}>\n" for h in HEADERS)


# --- probe programs ---------------------------------------------------------------


@dataclass
class Probe:
    """A C program that evaluates integer expressions and lays out objects."""

    #: (label, C integer expression), evaluated as ``long long``.
    values: list[tuple[str, str]] = field(default_factory=list)
    #: (label, C type, C initializer without braces): static const objects.
    objects: list[tuple[str, str, str]] = field(default_factory=list)
    #: (label, C expression of type const char *): native only.
    strings: list[tuple[str, str]] = field(default_factory=list)
    #: extra C text placed after the includes.
    prelude: str = ""

    def source(self) -> str:
        out = [includes(), self.prelude]
        vals = ", ".join(f"(long long)({e})" for _, e in self.values) or "0"
        out.append(f"const long long probe_values[] = {{ {vals} }};\n")
        for i, (_, ctype, init) in enumerate(self.objects):
            out.append(f"const {ctype} probe_obj_{i} = {{ {init} }};\n")
        out.append("#ifndef PROBE_NO_MAIN\n#include <stdio.h>\n")
        strs = ", ".join(e for _, e in self.strings) or "0"
        out.append(f"static const char *const probe_strings[] = {{ {strs} }};\n")
        out.append("static void dump(const void *p, size_t n) {\n"
                   "  const unsigned char *b = p;\n"
                   "  for (size_t i = 0; i < n; i++) printf(\"%02x\", b[i]);\n"
                   "  printf(\"\\n\");\n}\n")
        out.append("int main(void) {\n")
        out.append(f"  for (int i = 0; i < {len(self.values)}; i++)"
                   " printf(\"V %lld\\n\", probe_values[i]);\n")
        for i in range(len(self.objects)):
            out.append(f"  printf(\"O \"); dump(&probe_obj_{i}, sizeof probe_obj_{i});\n")
        out.append(f"  for (int i = 0; i < {len(self.strings)}; i++)"
                   " printf(\"S %s\\n\", probe_strings[i]);\n")
        out.append("  return 0;\n}\n#endif\n")
        return "".join(out)


@dataclass
class ProbeResult:
    values: dict[str, int]
    objects: dict[str, bytes]
    strings: dict[str, str]


def run_native(probe: Probe, workdir: Path) -> ProbeResult:
    """Build the probe for x86_64, run it, parse what it prints."""
    gcc = require_toolchain()
    src = workdir / "probe64.c"
    exe = workdir / "probe64"
    src.write_text(probe.source())
    run([gcc, *CFLAGS, "-o", str(exe), str(src)])
    lines = run([str(exe)]).splitlines()
    vals = [int(ln[2:]) for ln in lines if ln.startswith("V ")]
    objs = [bytes.fromhex(ln[2:]) for ln in lines if ln.startswith("O ")]
    strs = [ln[2:] for ln in lines if ln.startswith("S ")]
    assert len(vals) == len(probe.values) and len(objs) == len(probe.objects)
    assert len(strs) == len(probe.strings)
    return ProbeResult(
        dict(zip((k for k, _ in probe.values), vals, strict=True)),
        dict(zip((k for k, _, _ in probe.objects), objs, strict=True)),
        dict(zip((k for k, _ in probe.strings), strs, strict=True)),
    )


def run_m32(probe: Probe, workdir: Path) -> ProbeResult:
    """Compile the probe for x86_32 to assembly and read its data back."""
    assert not probe.strings, "strings are native only"
    gcc = require_toolchain()
    src = workdir / "probe32.c"
    asm = workdir / "probe32.s"
    src.write_text(probe.source())
    run([gcc, *CFLAGS, *M32_FLAGS, "-DPROBE_NO_MAIN", "-S", "-o", str(asm), str(src)])
    data = asm_data(asm.read_text())
    raw = data["probe_values"]
    n = len(probe.values)
    vals = [int.from_bytes(raw[8 * i:8 * i + 8], "little", signed=True) for i in range(n)]
    return ProbeResult(
        dict(zip((k for k, _ in probe.values), vals, strict=True)),
        {k: data[f"probe_obj_{i}"] for i, (k, _, _) in enumerate(probe.objects)},
        {},
    )


_WIDTH = {".byte": 1, ".value": 2, ".short": 2, ".2byte": 2, ".long": 4, ".4byte": 4,
          ".quad": 8, ".8byte": 8}


def asm_data(text: str) -> dict[str, bytes]:
    """The initialised bytes of every labelled object in gcc assembly output."""
    out: dict[str, bytes] = {}
    cur: str | None = None
    buf = bytearray()
    for raw in text.splitlines():
        line = raw.strip()
        m = re.fullmatch(r"([A-Za-z_][\w.]*):", line)
        if m:
            if cur is not None:
                out[cur] = bytes(buf)
            cur, buf = m.group(1), bytearray()
            continue
        if cur is None:
            continue
        parts = line.split(None, 1)
        if not parts:
            continue
        d = parts[0]
        if d in _WIDTH:
            for tok in parts[1].split(","):
                buf += (int(tok.strip(), 0) & ((1 << (8 * _WIDTH[d])) - 1)).to_bytes(
                    _WIDTH[d], "little")
        elif d in (".zero", ".skip"):
            buf += bytes(int(parts[1].split(",")[0], 0))
        else:
            out[cur] = bytes(buf)
            cur = None
    if cur is not None:
        out[cur] = bytes(buf)
    return out


# --- the member lists of header structs --------------------------------------------

#: A parsed member list: (name, members of an inline untagged struct/union or None).
Members = list[tuple[str, "Members | None"]]

_TOKEN = re.compile(r"[A-Za-z_]\w*|\d\w*|[{}\[\];,()*]|\S")


def preprocess(workdir: Path, m32: bool = False) -> str:
    gcc = require_toolchain()
    src = workdir / ("hdr32.c" if m32 else "hdr64.c")
    src.write_text(includes())
    flags = [*CFLAGS, *(M32_FLAGS if m32 else ())]
    return run([gcc, *flags, "-E", "-P", str(src)])


def _parse_body(toks: list[str], i: int) -> tuple[Members, int]:
    """Parse ``{ members }`` at ``toks[i] == "{"``; return members and the index after ``}``."""
    assert toks[i] == "{"
    i += 1
    members: Members = []
    while toks[i] != "}":
        children: Members | None = None
        if toks[i] in ("struct", "union"):
            i += 1
            tagged = toks[i] != "{"
            if tagged:
                i += 1
            if toks[i] == "{":
                body, i = _parse_body(toks, i)
                # A tagged inline struct is a type of its own, checked separately.
                children = None if tagged else body
        else:
            while toks[i + 1] not in (",", ";", "["):
                i += 1
        # declarators
        while True:
            while toks[i] == "*":
                i += 1
            name = toks[i]
            i += 1
            while toks[i] == "[":
                while toks[i] != "]":
                    i += 1
                i += 1
            members.append((name, children))
            if toks[i] == ",":
                i += 1
                continue
            assert toks[i] == ";", toks[i - 3:i + 3]
            i += 1
            break
    return members, i + 1


def _designators(members: Members, prefix: str = "") -> set[str]:
    out: set[str] = set()
    for name, children in members:
        out.add(prefix + name)
        if children is not None:
            out |= _designators(children, prefix + name + ".")
    return out


def header_members(preprocessed: str, ctype: str) -> set[str]:
    """Every member designator of ``ctype`` (``"struct gnttab_copy"``) in the headers.

    Members of inline untagged structs and unions are included
    (``u.interdomain.port``); members of separately tagged struct types are not.
    """
    kind, tag = ctype.split()
    toks = _TOKEN.findall(preprocessed)
    for i in range(len(toks) - 2):
        if toks[i] == kind and toks[i + 1] == tag and toks[i + 2] == "{":
            members, _ = _parse_body(toks, i + 2)
            return _designators(members)
    raise AssertionError(f"{ctype} not defined in the headers")


def header_defines(header: Path, prefixes: Sequence[str]) -> set[str]:
    """Object-like macros of ``header`` whose names start with one of ``prefixes``."""
    names = set()
    for m in re.finditer(r"^\s*#\s*define\s+([A-Za-z_]\w*)(\(?)", header.read_text(), re.M):
        if m.group(2) == "" and m.group(1).startswith(tuple(prefixes)):
            names.add(m.group(1))
    return names
