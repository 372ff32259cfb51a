"""The array checks of HYPERVISOR_grant_table_op, one op or several.

Xen 4.17 ``do_grant_table_op`` (xen/common/grant_table.c) hands the whole array
to the command's handler; ``gnttab_setup_table`` and ``gnttab_query_size`` take
exactly one op (``if ( count != 1 ) return -EINVAL``), and an op the guest
cannot hand over (here: an object of another op type, the dataclass form's
``copy_from_guest`` fault) is ``-EFAULT`` with no result.
"""

from __future__ import annotations

import errno

from gntdma.abi.grant_table import (
    GNTMAP_host_map,
    GNTMAP_readonly,
    GNTST_okay,
    GnttabMapGrantRef,
    GNTTABOP_map_grant_ref,
    GNTTABOP_query_size,
    GNTTABOP_unmap_grant_ref,
    GnttabQuerySize,
    GnttabUnmapGrantRef,
    GTF_permit_access,
    GTF_readonly,
)
from gntdma.abi.xen import DOMID_SELF
from gntdma.hv import Domain, Hypervisor, map_grant_ref_op, unmap_grant_ref_op

_ADDR = 0x7000_0000_0000


def test_an_op_of_another_type_is_efault_alone_or_in_an_array(hv: Hypervisor, dom0: Domain,
                                                              guest: Domain) -> None:
    query = GnttabQuerySize(dom=DOMID_SELF)
    unmap = unmap_grant_ref_op(_ADDR, 0)
    assert hv.grant_table_op(0, GNTTABOP_map_grant_ref, [query]) == (-errno.EFAULT, [])
    assert hv.grant_table_op(0, GNTTABOP_query_size, [unmap]) == (-errno.EFAULT, [])
    guest.gnttab.write(3, GTF_permit_access | GTF_readonly, 0, 5)
    ok = map_grant_ref_op(_ADDR, GNTMAP_host_map | GNTMAP_readonly, 3, guest.domid)
    # Checked before any op is done: the good op before it maps nothing.
    assert hv.grant_table_op(0, GNTTABOP_map_grant_ref, [ok, query]) == (-errno.EFAULT, [])
    assert not dom0.maptrack.entries


def test_one_op_gives_one_result_as_in_an_array(hv: Hypervisor, dom0: Domain,
                                               guest: Domain) -> None:
    guest.gnttab.write(3, GTF_permit_access | GTF_readonly, 0, 5)
    op = map_grant_ref_op(_ADDR, GNTMAP_host_map | GNTMAP_readonly, 3, guest.domid)
    rc, res = hv.grant_table_op(0, GNTTABOP_map_grant_ref, [op])
    assert rc == 0 and len(res) == 1 and isinstance(res[0], GnttabMapGrantRef)
    assert res[0].status == GNTST_okay and res[0].ref == 3
    rc, res2 = hv.grant_table_op(0, GNTTABOP_unmap_grant_ref,
                                 (unmap_grant_ref_op(_ADDR, res[0].handle),))
    assert rc == 0 and len(res2) == 1 and isinstance(res2[0], GnttabUnmapGrantRef)
    assert res2[0].status == GNTST_okay
    query = GnttabQuerySize(dom=DOMID_SELF)
    rc, (q,) = hv.grant_table_op(guest.domid, GNTTABOP_query_size, [query])
    assert rc == 0 and isinstance(q, GnttabQuerySize) and q.status == GNTST_okay
