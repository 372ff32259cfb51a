"""Grant tables: constants and hypercall structs of ``xen/grant_table.h`` (v1, x86_64).

Every constant exists twice: as a member of an ``IntEnum``/``IntFlag`` class named
after its header prefix (``GTF.permit_access``, ``GNTST.bad_gntref``) and as a
module constant with the exact header name (``GTF_permit_access``,
``GNTST_bad_gntref``); both are the same object.

Every struct is the x86_64 layout of its header struct, checked against the
Debian ``libxen-dev`` headers by ``tests/abi/test_c_layout.py``. Field values are
plain ints: what a peer or a caller wrote, to be validated by whoever uses it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import Any, ClassVar, Final, final

from gntdma.abi._wire import Field, Layout, WireStruct, layout, wire
from gntdma.abi.xen import PAGE_SIZE, GrantRef

__all__ = [
    "GNTCOPY",
    "GNTCOPY_dest_gref",
    "GNTCOPY_source_gref",
    "GNTMAP",
    "GNTMAP_application_map",
    "GNTMAP_contains_pte",
    "GNTMAP_device_map",
    "GNTMAP_guest_avail_mask",
    "GNTMAP_host_map",
    "GNTMAP_readonly",
    "GNTST",
    "GNTST_address_too_big",
    "GNTST_bad_copy_arg",
    "GNTST_bad_dev_addr",
    "GNTST_bad_domain",
    "GNTST_bad_gntref",
    "GNTST_bad_handle",
    "GNTST_bad_page",
    "GNTST_bad_virt_addr",
    "GNTST_eagain",
    "GNTST_general_error",
    "GNTST_no_device_space",
    "GNTST_no_space",
    "GNTST_okay",
    "GNTST_permission_denied",
    "GNTTABOP",
    "GNTTABOP_cache_flush",
    "GNTTABOP_copy",
    "GNTTABOP_dump_table",
    "GNTTABOP_error_msgs",
    "GNTTABOP_get_status_frames",
    "GNTTABOP_get_version",
    "GNTTABOP_map_grant_ref",
    "GNTTABOP_query_size",
    "GNTTABOP_set_version",
    "GNTTABOP_setup_table",
    "GNTTABOP_swap_grant_ref",
    "GNTTABOP_transfer",
    "GNTTABOP_unmap_and_replace",
    "GNTTABOP_unmap_grant_ref",
    "GNTTAB_CACHE_CLEAN",
    "GNTTAB_CACHE_INVAL",
    "GNTTAB_CACHE_SOURCE_GREF",
    "GNTTAB_NR_RESERVED_ENTRIES",
    "GNTTAB_RESERVED_CONSOLE",
    "GNTTAB_RESERVED_XENSTORE",
    "GREFS_PER_GRANT_FRAME",
    "GRANT_REF_INVALID",
    "GTF",
    "GTF_PAT",
    "GTF_PCD",
    "GTF_PWT",
    "GTF_accept_transfer",
    "GTF_invalid",
    "GTF_permit_access",
    "GTF_readonly",
    "GTF_reading",
    "GTF_sub_page",
    "GTF_transfer_committed",
    "GTF_transfer_completed",
    "GTF_transitive",
    "GTF_type_mask",
    "GTF_writing",
    "NR_RESERVED_ENTRIES",
    "GnttabCopy",
    "GnttabCopyPtr",
    "GnttabDumpTable",
    "GnttabMapGrantRef",
    "GnttabQuerySize",
    "GnttabSetupTable",
    "GnttabTransfer",
    "GnttabUnmapGrantRef",
    "GrantEntryV1",
    "GRANT_ENTRY_V1",
    "GRANT_ENTRY_V1_DOMID_FRAME",
    "GRANT_ENTRY_V1_DOMID_OFFSET",
    "GRANT_ENTRY_V1_FLAGS",
    "GRANT_ENTRY_V1_SIZE",
    "grant_entry_v1_slot",
    "gntst_message",
]

# --- reserved entries -------------------------------------------------------------

#: Grant refs 0..7 are reserved for the toolstack (``GNTTAB_NR_RESERVED_ENTRIES``).
GNTTAB_NR_RESERVED_ENTRIES: Final = 8
#: Same as :data:`GNTTAB_NR_RESERVED_ENTRIES` (the guest kernels' short name).
NR_RESERVED_ENTRIES: Final = GNTTAB_NR_RESERVED_ENTRIES
#: Ref 0 grants the console ring page to the console backend.
GNTTAB_RESERVED_CONSOLE: Final = GrantRef(0)
#: Ref 1 grants the xenstore ring page to the xenstore domain.
GNTTAB_RESERVED_XENSTORE: Final = GrantRef(1)
#: v1 entries per grant-table frame: 4096 / sizeof(grant_entry_v1_t).
GREFS_PER_GRANT_FRAME: Final = PAGE_SIZE // 8
#: No grant reference (all ones, as Xen's ``INVALID_GRANT_REF`` / Linux ``GRANT_INVALID_REF``
#: family use in the guest kernels; not a value of the public header).
GRANT_REF_INVALID: Final = GrantRef(0xFFFFFFFF)


# --- flags of a grant entry -------------------------------------------------------


class GTF(IntFlag):
    """The u16 ``flags`` of a grant entry (``GTF_*`` in grant_table.h).

    Bits 0-1 are the type (``type_mask``); the others are sub-flags. For
    ``accept_transfer`` entries bits 2 and 3 mean ``transfer_committed`` and
    ``transfer_completed`` instead of ``readonly`` and ``reading``.
    """

    invalid = 0  #: the entry grants nothing
    permit_access = 1  #: grantee may map or copy the frame
    accept_transfer = 2  #: grantee may transfer a page into the slot
    transitive = 3  #: v2 only: grant a grant, copy only
    type_mask = 3  #: the type bits
    readonly = 1 << 2  #: guest: grantee may only read
    reading = 1 << 3  #: Xen: grantee has it mapped or pinned for reading
    writing = 1 << 4  #: Xen: grantee has it mapped or pinned for writing
    PWT = 1 << 5  #: x86 cache attribute of mappings (write-through)
    PCD = 1 << 6  #: x86 cache attribute of mappings (cache disable)
    PAT = 1 << 7  #: x86 cache attribute of mappings (PAT)
    sub_page = 1 << 8  #: v2 only: byte sub-range, copy only
    transfer_committed = 1 << 2  #: accept_transfer: Xen has committed the transfer
    transfer_completed = 1 << 3  #: accept_transfer: the frame is written, safe to read


GTF_invalid: Final = GTF.invalid
GTF_permit_access: Final = GTF.permit_access
GTF_accept_transfer: Final = GTF.accept_transfer
GTF_transitive: Final = GTF.transitive
GTF_type_mask: Final = GTF.type_mask
GTF_readonly: Final = GTF.readonly
GTF_reading: Final = GTF.reading
GTF_writing: Final = GTF.writing
GTF_PWT: Final = GTF.PWT
GTF_PCD: Final = GTF.PCD
GTF_PAT: Final = GTF.PAT
GTF_sub_page: Final = GTF.sub_page
GTF_transfer_committed: Final = GTF.transfer_committed
GTF_transfer_completed: Final = GTF.transfer_completed


# --- hypercall commands, flags and status -----------------------------------------


class GNTTABOP(IntEnum):
    """Commands of ``HYPERVISOR_grant_table_op(cmd, args, count)`` (``GNTTABOP_*``)."""

    map_grant_ref = 0  #: :class:`GnttabMapGrantRef`
    unmap_grant_ref = 1  #: :class:`GnttabUnmapGrantRef`
    setup_table = 2  #: :class:`GnttabSetupTable`
    dump_table = 3  #: :class:`GnttabDumpTable`
    transfer = 4  #: :class:`GnttabTransfer` (PV only)
    copy = 5  #: :class:`GnttabCopy`
    query_size = 6  #: :class:`GnttabQuerySize`
    unmap_and_replace = 7  #: PV only
    set_version = 8  #: v1/v2 switch
    get_status_frames = 9  #: v2 status frames
    get_version = 10  #: current table version
    swap_grant_ref = 11  #: swap two entries
    cache_flush = 12  #: Arm cache maintenance


GNTTABOP_map_grant_ref: Final = GNTTABOP.map_grant_ref
GNTTABOP_unmap_grant_ref: Final = GNTTABOP.unmap_grant_ref
GNTTABOP_setup_table: Final = GNTTABOP.setup_table
GNTTABOP_dump_table: Final = GNTTABOP.dump_table
GNTTABOP_transfer: Final = GNTTABOP.transfer
GNTTABOP_copy: Final = GNTTABOP.copy
GNTTABOP_query_size: Final = GNTTABOP.query_size
GNTTABOP_unmap_and_replace: Final = GNTTABOP.unmap_and_replace
GNTTABOP_set_version: Final = GNTTABOP.set_version
GNTTABOP_get_status_frames: Final = GNTTABOP.get_status_frames
GNTTABOP_get_version: Final = GNTTABOP.get_version
GNTTABOP_swap_grant_ref: Final = GNTTABOP.swap_grant_ref
GNTTABOP_cache_flush: Final = GNTTABOP.cache_flush


class GNTMAP(IntFlag):
    """The ``flags`` of :class:`GnttabMapGrantRef` (``GNTMAP_*``)."""

    device_map = 1 << 0  #: map for device (bus) access: returns ``dev_bus_addr``
    host_map = 1 << 1  #: map into the caller's address space at ``host_addr``
    readonly = 1 << 2  #: map read-only
    application_map = 1 << 3  #: PV: user-accessible mapping
    contains_pte = 1 << 4  #: PV: ``host_addr`` is the address of a PTE
    guest_avail_mask = 0xFFFF0000  #: bits 16-31 are available to the guest


GNTMAP_device_map: Final = GNTMAP.device_map
GNTMAP_host_map: Final = GNTMAP.host_map
GNTMAP_readonly: Final = GNTMAP.readonly
GNTMAP_application_map: Final = GNTMAP.application_map
GNTMAP_contains_pte: Final = GNTMAP.contains_pte
GNTMAP_guest_avail_mask: Final = GNTMAP.guest_avail_mask


class GNTCOPY(IntFlag):
    """The ``flags`` of :class:`GnttabCopy` (``GNTCOPY_*``)."""

    source_gref = 1 << 0  #: ``source.u`` is a grant ref of ``source.domid``
    dest_gref = 1 << 1  #: ``dest.u`` is a grant ref of ``dest.domid``


GNTCOPY_source_gref: Final = GNTCOPY.source_gref
GNTCOPY_dest_gref: Final = GNTCOPY.dest_gref

#: ``GNTTABOP_cache_flush`` operation bits.
GNTTAB_CACHE_CLEAN: Final = 1 << 0
GNTTAB_CACHE_INVAL: Final = 1 << 1
GNTTAB_CACHE_SOURCE_GREF: Final = 1 << 31


class GNTST(IntEnum):
    """Per-element status of a grant-table op (``GNTST_*``, int16)."""

    okay = 0  #: normal return
    general_error = -1  #: general undefined error
    bad_domain = -2  #: unrecognised domain id
    bad_gntref = -3  #: unrecognised or inappropriate grant ref
    bad_handle = -4  #: unrecognised or inappropriate mapping handle
    bad_virt_addr = -5  #: inappropriate virtual address to map
    bad_dev_addr = -6  #: inappropriate device address to unmap
    no_device_space = -7  #: out of space in the I/O MMU
    permission_denied = -8  #: not enough privilege for the operation
    bad_page = -9  #: the page was invalid for the op
    bad_copy_arg = -10  #: copy arguments cross a page boundary
    address_too_big = -11  #: transfer page address too large
    eagain = -12  #: operation not done; try again
    no_space = -13  #: out of space (handles etc.)


GNTST_okay: Final = GNTST.okay
GNTST_general_error: Final = GNTST.general_error
GNTST_bad_domain: Final = GNTST.bad_domain
GNTST_bad_gntref: Final = GNTST.bad_gntref
GNTST_bad_handle: Final = GNTST.bad_handle
GNTST_bad_virt_addr: Final = GNTST.bad_virt_addr
GNTST_bad_dev_addr: Final = GNTST.bad_dev_addr
GNTST_no_device_space: Final = GNTST.no_device_space
GNTST_permission_denied: Final = GNTST.permission_denied
GNTST_bad_page: Final = GNTST.bad_page
GNTST_bad_copy_arg: Final = GNTST.bad_copy_arg
GNTST_address_too_big: Final = GNTST.address_too_big
GNTST_eagain: Final = GNTST.eagain
GNTST_no_space: Final = GNTST.no_space

#: ``GNTTABOP_error_msgs``: the message of status ``-i`` at index ``i``.
GNTTABOP_error_msgs: Final[tuple[str, ...]] = (
    "okay",
    "undefined error",
    "unrecognised domain id",
    "invalid grant reference",
    "invalid mapping handle",
    "invalid virtual address",
    "invalid device address",
    "no spare translation slot in the I/O MMU",
    "permission denied",
    "bad page",
    "copy arguments cross page boundary",
    "page address size too large",
    "operation not done; try again",
    "out of space",
)


def gntst_message(status: int) -> str:
    """Xen's message for a ``GNTST_*`` status (``GNTTABOP_error_msgs``).

    A status outside the table (a peer may report anything) gets a message that
    names the number, never an exception.
    """
    if -len(GNTTABOP_error_msgs) < status <= 0:
        return GNTTABOP_error_msgs[-status]
    return f"unknown grant status {status}"


# --- structs ----------------------------------------------------------------------


@final
@wire(size=8)
@dataclass(frozen=True, slots=True)
class GrantEntryV1(WireStruct):
    """``struct grant_entry_v1``: one 8-byte entry of a v1 grant table.

    The granting guest writes ``domid`` and ``frame``, a write barrier, then
    ``flags``; Xen sets ``GTF_reading``/``GTF_writing`` while the grant is used.
    """

    CTYPE: ClassVar[str] = "struct grant_entry_v1"
    LAYOUT: ClassVar[Layout] = layout(("flags", "H"), ("domid", "H"), ("frame", "I"))
    STRUCT: ClassVar[struct.Struct] = LAYOUT.struct
    FIELDS: ClassVar[tuple[Field, ...]] = LAYOUT.fields

    flags: int = 0  #: ``GTF_*``
    domid: int = 0  #: the grantee domain
    frame: int = 0  #: the granted frame (GFN)


@final
@wire(size=32)
@dataclass(frozen=True, slots=True)
class GnttabMapGrantRef(WireStruct):
    """``struct gnttab_map_grant_ref`` (``GNTTABOP_map_grant_ref``).

    IN: ``host_addr``, ``flags`` (``GNTMAP_*``), ``ref``, ``dom``; OUT: ``status``
    (``GNTST_*``), ``handle`` (to unmap with), ``dev_bus_addr``.
    """

    CTYPE: ClassVar[str] = "struct gnttab_map_grant_ref"
    LAYOUT: ClassVar[Layout] = layout(
        ("host_addr", "Q"),
        ("flags", "I"),
        ("ref", "I"),
        ("dom", "H"),
        ("status", "h"),
        ("handle", "I"),
        ("dev_bus_addr", "Q"),
    )
    STRUCT: ClassVar[struct.Struct] = LAYOUT.struct
    FIELDS: ClassVar[tuple[Field, ...]] = LAYOUT.fields

    host_addr: int = 0
    flags: int = 0
    ref: int = 0
    dom: int = 0
    status: int = 0
    handle: int = 0
    dev_bus_addr: int = 0


@final
@wire(size=24)
@dataclass(frozen=True, slots=True)
class GnttabUnmapGrantRef(WireStruct):
    """``struct gnttab_unmap_grant_ref`` (``GNTTABOP_unmap_grant_ref``).

    IN: ``host_addr`` and ``dev_bus_addr`` (0 = not checked), ``handle``; OUT: ``status``.
    """

    CTYPE: ClassVar[str] = "struct gnttab_unmap_grant_ref"
    LAYOUT: ClassVar[Layout] = layout(
        ("host_addr", "Q"),
        ("dev_bus_addr", "Q"),
        ("handle", "I"),
        ("status", "h"),
        ("", "2x"),
    )
    STRUCT: ClassVar[struct.Struct] = LAYOUT.struct
    FIELDS: ClassVar[tuple[Field, ...]] = LAYOUT.fields

    host_addr: int = 0
    dev_bus_addr: int = 0
    handle: int = 0
    status: int = 0


@final
@wire(size=24)
@dataclass(frozen=True, slots=True)
class GnttabSetupTable(WireStruct):
    """``struct gnttab_setup_table`` (``GNTTABOP_setup_table``).

    IN: ``dom`` (``DOMID_SELF``), ``nr_frames``; OUT: ``status``; ``frame_list`` is
    a guest handle (an address) of a ``xen_pfn_t`` array that receives the frames.
    """

    CTYPE: ClassVar[str] = "struct gnttab_setup_table"
    LAYOUT: ClassVar[Layout] = layout(
        ("dom", "H"),
        ("", "2x"),
        ("nr_frames", "I"),
        ("status", "h"),
        ("", "6x"),
        ("frame_list", "Q"),
    )
    STRUCT: ClassVar[struct.Struct] = LAYOUT.struct
    FIELDS: ClassVar[tuple[Field, ...]] = LAYOUT.fields

    dom: int = 0
    nr_frames: int = 0
    status: int = 0
    frame_list: int = 0


@final
@wire(size=4)
@dataclass(frozen=True, slots=True)
class GnttabDumpTable(WireStruct):
    """``struct gnttab_dump_table`` (``GNTTABOP_dump_table``, debug)."""

    CTYPE: ClassVar[str] = "struct gnttab_dump_table"
    LAYOUT: ClassVar[Layout] = layout(("dom", "H"), ("status", "h"))
    STRUCT: ClassVar[struct.Struct] = LAYOUT.struct
    FIELDS: ClassVar[tuple[Field, ...]] = LAYOUT.fields

    dom: int = 0
    status: int = 0


@final
@wire(size=24)
@dataclass(frozen=True, slots=True)
class GnttabTransfer(WireStruct):
    """``struct gnttab_transfer`` (``GNTTABOP_transfer``, PV only)."""

    CTYPE: ClassVar[str] = "struct gnttab_transfer"
    LAYOUT: ClassVar[Layout] = layout(
        ("mfn", "Q"),
        ("domid", "H"),
        ("", "2x"),
        ("ref", "I"),
        ("status", "h"),
        ("", "6x"),
    )
    STRUCT: ClassVar[struct.Struct] = LAYOUT.struct
    FIELDS: ClassVar[tuple[Field, ...]] = LAYOUT.fields

    mfn: int = 0
    domid: int = 0
    ref: int = 0
    status: int = 0


@final
@wire(size=16)
@dataclass(frozen=True, slots=True)
class GnttabQuerySize(WireStruct):
    """``struct gnttab_query_size`` (``GNTTABOP_query_size``).

    IN: ``dom``; OUT: ``nr_frames``, ``max_nr_frames``, ``status``.
    """

    CTYPE: ClassVar[str] = "struct gnttab_query_size"
    LAYOUT: ClassVar[Layout] = layout(
        ("dom", "H"),
        ("", "2x"),
        ("nr_frames", "I"),
        ("max_nr_frames", "I"),
        ("status", "h"),
        ("", "2x"),
    )
    STRUCT: ClassVar[struct.Struct] = LAYOUT.struct
    FIELDS: ClassVar[tuple[Field, ...]] = LAYOUT.fields

    dom: int = 0
    nr_frames: int = 0
    max_nr_frames: int = 0
    status: int = 0


@final
@wire(size=16)
@dataclass(frozen=True, slots=True)
class GnttabCopyPtr(WireStruct):
    """``struct gnttab_copy_ptr``: one side of a :class:`GnttabCopy`.

    ``u`` is the union ``{grant_ref_t ref; xen_pfn_t gmfn;}``: a grant ref of
    ``domid`` when the op's ``GNTCOPY_*_gref`` flag is set (only the low 32 bits
    count), else a frame of the caller (``domid`` must be ``DOMID_SELF``).
    """

    CTYPE: ClassVar[str] = "struct gnttab_copy_ptr"
    LAYOUT: ClassVar[Layout] = layout(
        ("u", "Q"),
        ("domid", "H"),
        ("offset", "H"),
        ("", "4x"),
        extra=(("u.ref", 0, 4), ("u.gmfn", 0, 8)),
    )
    STRUCT: ClassVar[struct.Struct] = LAYOUT.struct
    FIELDS: ClassVar[tuple[Field, ...]] = LAYOUT.fields

    u: int = 0  #: the union, as the u64 ``gmfn`` view
    domid: int = 0
    offset: int = 0  #: byte offset in the page

    @property
    def ref(self) -> int:
        """The ``u.ref`` view: the low 32 bits of ``u``."""
        return self.u & 0xFFFFFFFF

    @property
    def gmfn(self) -> int:
        """The ``u.gmfn`` view: all of ``u``."""
        return self.u


@final
@wire(size=40)
@dataclass(frozen=True, slots=True)
class GnttabCopy(WireStruct):
    """``struct gnttab_copy`` (``GNTTABOP_copy``).

    IN: ``source``, ``dest``, ``len``, ``flags`` (``GNTCOPY_*``); OUT: ``status``.
    """

    CTYPE: ClassVar[str] = "struct gnttab_copy"
    LAYOUT: ClassVar[Layout] = layout(
        ("source", "16s"),
        ("dest", "16s"),
        ("len", "H"),
        ("flags", "H"),
        ("status", "h"),
        ("", "2x"),
    )
    STRUCT: ClassVar[struct.Struct] = LAYOUT.struct
    FIELDS: ClassVar[tuple[Field, ...]] = LAYOUT.fields

    source: GnttabCopyPtr = GnttabCopyPtr()
    dest: GnttabCopyPtr = GnttabCopyPtr()
    len: int = 0
    flags: int = 0
    status: int = 0

    def _values(self) -> tuple[Any, ...]:
        return (self.source.pack(), self.dest.pack(), self.len, self.flags, self.status)

    @classmethod
    def _from_values(cls, values: tuple[Any, ...]) -> GnttabCopy:
        source, dest, length, flags, status = values
        return cls(GnttabCopyPtr.unpack(source), GnttabCopyPtr.unpack(dest), length, flags,
                   status)


# --- where an entry lives ---------------------------------------------------------
# The hypervisor and the guest both reach entries in the table frames with these
# precompiled views of :class:`GrantEntryV1` (one definition of the layout).

#: sizeof(grant_entry_v1_t).
GRANT_ENTRY_V1_SIZE: Final = GrantEntryV1.STRUCT.size
#: The whole entry: (flags, domid, frame).
GRANT_ENTRY_V1: Final = GrantEntryV1.STRUCT
#: ``flags`` alone, at the entry's offset (the u16 Xen and the guest update).
GRANT_ENTRY_V1_FLAGS: Final = struct.Struct("<" + GrantEntryV1.LAYOUT.codes[0])
#: Offset of ``domid`` in the entry; ``domid`` and ``frame`` follow each other.
GRANT_ENTRY_V1_DOMID_OFFSET: Final = GrantEntryV1.FIELDS[1][1]
#: (domid, frame), at the entry's offset + :data:`GRANT_ENTRY_V1_DOMID_OFFSET`.
GRANT_ENTRY_V1_DOMID_FRAME: Final = struct.Struct("<" + "".join(GrantEntryV1.LAYOUT.codes[1:]))


def grant_entry_v1_slot(ref: int) -> tuple[int, int]:
    """(index of the table frame, byte offset in it) of v1 entry ``ref``.

    Xen's ``shared_entry_v1(t, e)``: frame ``e / GREFS_PER_GRANT_FRAME``, entry
    ``e % GREFS_PER_GRANT_FRAME`` of that frame.
    """
    f, i = divmod(ref, GREFS_PER_GRANT_FRAME)
    return f, i * GRANT_ENTRY_V1_SIZE
