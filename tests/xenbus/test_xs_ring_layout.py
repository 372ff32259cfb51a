"""The store page layout and the xenbus constants against Debian's libxen-dev headers.

A small C probe includes ``xen/io/xs_wire.h`` and ``xen/io/xenbus.h`` and prints
``offsetof``/``sizeof`` of ``struct xenstore_domain_interface`` and the value of
every constant both ends of the ring use. The constants are defined once, in
:mod:`gntdma.abi.xs_wire`, for the daemon's ``_ring`` module and the guest's
``xenstore`` client alike. A missing gcc or header is a failure: ``make test``
installs both.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from gntdma.abi import xs_ring, xs_wire
from gntdma.xen import xenbus, xenstore
from gntdma.xenstored import _ring, _wire

HEADERS = ("xen/io/xs_wire.h", "xen/io/xenbus.h")


@pytest.fixture(scope="module")
def c_values(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    gcc = shutil.which("gcc")
    assert gcc is not None, "gcc missing: `make test` installs it"
    for h in HEADERS:
        assert (Path("/usr/include") / h).is_file(), f"{h} missing: install libxen-dev"
    exprs: list[tuple[str, str]] = []
    for field in xs_wire.XENSTORE_DOMAIN_INTERFACE_OFFSETS:
        exprs.append((f"off.{field}",
                      f"offsetof(struct xenstore_domain_interface, {field})"))
    exprs.append(("sizeof", "sizeof(struct xenstore_domain_interface)"))
    exprs.append(("sizeof.req", "sizeof(((struct xenstore_domain_interface *)0)->req)"))
    exprs.append(("sizeof.idx", "sizeof(XENSTORE_RING_IDX)"))
    for name in ("XENSTORE_RING_SIZE", "XENSTORE_PAYLOAD_MAX", "XENSTORE_ABS_PATH_MAX",
                 "XENSTORE_REL_PATH_MAX", "XENSTORE_SERVER_FEATURE_RECONNECTION",
                 "XENSTORE_SERVER_FEATURE_ERROR", "XENSTORE_CONNECTED",
                 "XENSTORE_RECONNECT", "XENSTORE_ERROR_NONE", "XENSTORE_ERROR_COMM",
                 "XENSTORE_ERROR_RINGIDX", "XENSTORE_ERROR_PROTO"):
        exprs.append((name, name))
    exprs.append(("MASK_XENSTORE_IDX", "MASK_XENSTORE_IDX(0xffffffffu)"))
    for t in xs_wire.XsdType:
        exprs.append((t.name, t.name))
    for s in xenbus.XenbusState:
        exprs.append((f"XenbusState{s.name}", f"XenbusState{s.name}"))
    for i, (_, name) in enumerate(xs_wire.XSD_ERRORS):
        exprs.append((f"xsd_errors[{i}]", f"xsd_errors[{i}].errnum"))
        exprs.append((f"errno.{name}", name))
    exprs.append(("nerrors", "sizeof(xsd_errors) / sizeof(xsd_errors[0])"))
    src = ["#include <stdint.h>", "#include <stddef.h>", "#include <stdio.h>",
           "#include <errno.h>", *(f"#include <{h}>" for h in HEADERS),
           "int main(void) {"]
    src += [f'  printf("%lld\\n", (long long)({e}));' for _, e in exprs]
    src += ["  return 0;", "}"]
    d = tmp_path_factory.mktemp("xsprobe")
    (d / "probe.c").write_text("\n".join(src) + "\n")
    build = subprocess.run([gcc, "-std=gnu11", "-Wall", "-Werror", "-o", str(d / "probe"),
                            str(d / "probe.c")], capture_output=True, text=True, check=False)
    assert build.returncode == 0, build.stderr
    out = subprocess.run([str(d / "probe")], capture_output=True, text=True, check=True)
    values = [int(x) for x in out.stdout.split()]
    assert len(values) == len(exprs)
    return {label: v for (label, _), v in zip(exprs, values, strict=True)}


def test_store_page_layout(c_values: dict[str, int]) -> None:
    offsets = xs_wire.XENSTORE_DOMAIN_INTERFACE_OFFSETS
    for field, off in offsets.items():
        assert c_values[f"off.{field}"] == off, field
    assert set(offsets) == {k[4:] for k in c_values if k.startswith("off.")}
    assert c_values["sizeof"] == xs_wire.XENSTORE_DOMAIN_INTERFACE_SIZE == 2076
    assert c_values["sizeof.req"] == xs_wire.XENSTORE_RING_SIZE
    assert c_values["sizeof.idx"] == 4
    assert c_values["MASK_XENSTORE_IDX"] == xs_wire.MASK_XENSTORE_IDX
    for name in ("XENSTORE_RING_SIZE", "XENSTORE_SERVER_FEATURE_RECONNECTION",
                 "XENSTORE_SERVER_FEATURE_ERROR", "XENSTORE_CONNECTED",
                 "XENSTORE_RECONNECT", "XENSTORE_ERROR_NONE", "XENSTORE_ERROR_COMM",
                 "XENSTORE_ERROR_RINGIDX", "XENSTORE_ERROR_PROTO"):
        assert c_values[name] == getattr(xs_wire, name), name


def test_wire_constants(c_values: dict[str, int]) -> None:
    for name in ("XENSTORE_PAYLOAD_MAX", "XENSTORE_ABS_PATH_MAX", "XENSTORE_REL_PATH_MAX"):
        assert c_values[name] == getattr(xs_wire, name), name
    for t in xs_wire.XsdType:
        assert c_values[t.name] == t.value, t.name
    assert c_values["nerrors"] == len(xs_wire.XSD_ERRORS)
    for i, (num, name) in enumerate(xs_wire.XSD_ERRORS):
        assert c_values[f"xsd_errors[{i}]"] == c_values[f"errno.{name}"] == num, name


@pytest.mark.parametrize("mod", [xenstore, _ring, _wire], ids=["client", "daemon", "codec"])
def test_both_ends_use_the_abi_definitions(mod: Any) -> None:
    shared = [name for name in xs_wire.__all__ if name in vars(mod)]
    # The ring code lives in gntdma.abi.xs_ring, which takes the constants from xs_wire.
    uses_ring = vars(mod).get("XsByteRing") is xs_ring.XsByteRing
    assert "XENSTORE_PAYLOAD_MAX" in shared or "XENSTORE_RING_SIZE" in shared or uses_ring
    for name in shared:
        assert getattr(mod, name) is getattr(xs_wire, name), name


def test_xenbus_states(c_values: dict[str, int]) -> None:
    assert [s.value for s in xenbus.XenbusState] == list(range(9))
    for s in xenbus.XenbusState:
        assert c_values[f"XenbusState{s.name}"] == s.value
        assert getattr(xenbus, f"XenbusState{s.name}") is s
