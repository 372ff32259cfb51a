"""gntdma.xenstored: the xenstore daemon of the emulated host.

The tree with permissions, transactions, watches and quotas
(:class:`Xenstored`), reached through :class:`Connection` objects that know
nothing of their transport; the xs_wire codec (:mod:`._wire`); and a Unix
socket server (:class:`XenstoredServer`) so that Debian's xenstore-utils and
pyxs work against it (``XENSTORED_PATH=<socket>``).
"""

from gntdma.xenstored._core import Connection, Xenstored, XenstoredStatistics
from gntdma.xenstored._store import (
    QUOTA_MAX_ENTRY_SIZE,
    QUOTA_MAX_PATH_LEN,
    QUOTA_MAX_TRANSACTION,
    QUOTA_NB_ENTRY_PER_DOMAIN,
    QUOTA_NB_PERMS_PER_NODE,
    QUOTA_NB_WATCH_PER_DOMAIN,
    QUOTA_TRANS_NODES,
    Quotas,
)
from gntdma.xenstored._tree import Perm, XsPerm, is_valid_path, parse_perm
from gntdma.xenstored._watch import Watch
from gntdma.xenstored._wire import (
    XENSTORE_ABS_PATH_MAX,
    XENSTORE_PAYLOAD_MAX,
    XENSTORE_REL_PATH_MAX,
    XS_TYPE_COUNT,
    XSD_ERRORS,
    Message,
    MessageReader,
    XsdSockmsg,
    XsdType,
    XsError,
    XsProtocolError,
    errno_from_name,
    errno_name,
)

__all__ = [
    "QUOTA_MAX_ENTRY_SIZE",
    "QUOTA_MAX_PATH_LEN",
    "QUOTA_MAX_TRANSACTION",
    "QUOTA_NB_ENTRY_PER_DOMAIN",
    "QUOTA_NB_PERMS_PER_NODE",
    "QUOTA_NB_WATCH_PER_DOMAIN",
    "QUOTA_TRANS_NODES",
    "XENSTORE_ABS_PATH_MAX",
    "XENSTORE_PAYLOAD_MAX",
    "XENSTORE_REL_PATH_MAX",
    "XSD_ERRORS",
    "XS_TYPE_COUNT",
    "Connection",
    "Message",
    "MessageReader",
    "Perm",
    "Quotas",
    "Watch",
    "Xenstored",
    "XenstoredStatistics",
    "XsError",
    "XsPerm",
    "XsProtocolError",
    "XsdSockmsg",
    "XsdType",
    "errno_from_name",
    "errno_name",
    "is_valid_path",
    "parse_perm",
]
