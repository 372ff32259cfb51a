"""What xenstored keeps for a domain goes with it: nothing grows with every domain a
long-lived host has had (C xenstored frees ``struct domain`` and its node
accounting in ``domain_cleanup``/``destroy_domain``, xenstored_domain.c)."""

from __future__ import annotations

from gntdma.xenstored import Xenstored


def test_node_counts_of_released_domains_are_forgotten() -> None:
    xsd = Xenstored(domain_exists=lambda domid: True)
    for domid in range(1, 51):
        home = xsd.introduce_domain(domid)
        xsd.write(f"{home}/name", b"g")
        xsd.set_perms(f"{home}/name", ["n0", f"r{domid}"])
        xsd.write(f"{home}/data", b"x")
        xsd.set_perms(f"{home}/data", [f"n{domid}"])
        xsd.release_domain(domid)
    assert set(xsd.store.owner_counts) == {0}  # /local and /local/domain stay, dom0's
    assert xsd.domain_usage(7)["nodes"] == 0
