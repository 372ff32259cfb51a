"""The one root exception of gntdma, for code above the guest kernel.

Kernel code (``sys``, ``xen``, ``dev``) keeps the C contract and returns errno
ints; hypercalls return what Xen returns. Everything above raises subclasses of
:class:`GntdmaError`. This module imports nothing of gntdma, so every layer may
use it.
"""

__all__ = ["ConfigError", "GntdmaError"]


class GntdmaError(Exception):
    """Root of every exception gntdma raises above the kernel."""


class ConfigError(GntdmaError, ValueError):
    """A configuration or command-line value is invalid."""
