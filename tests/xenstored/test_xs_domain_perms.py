"""Permissions naming domains that do not exist (XSA-322), as C xenstored 4.17.

Sources (Xen RELEASE-4.17.x, ``tools/xenstore/``):

- ``xenstored_domain.c`` ``domain_alloc_permrefs``: at SET_PERMS, an entry
  naming a domain xenstored does not know and the hypervisor does not have
  (``get_domain_info``) is marked ``XS_PERM_IGNORE``; ``xenstored_core.c``
  ``do_set_perms``: if that is the owner (first entry), ENOENT.
- ``xenstored_domain.c`` ``alloc_domain``: a domain's ``generation`` is the
  global count when xenstored learns of it (at INTRODUCE, or when a
  permission names a domain the host created); ``destroy_domain`` (RELEASE)
  forgets it.
- ``domain_adjust_node_perms``/``chk_domain_generation``: on every read of a
  node, entries after the first whose domain is gone or younger than the node
  are marked ignored; ``write_node_raw`` keeps the mark, so a later domain
  that reuses the domid inherits no access. ``perm_for_conn`` skips ignored
  entries; ``xs_perm_to_string`` still lists them (GET_PERMS).
"""

from __future__ import annotations

import errno

from xs_helpers import Client, errno_of

from gntdma.xenstored import Xenstored


def test_permission_entry_for_a_domain_that_does_not_exist_grants_nothing() -> None:
    xsd = Xenstored()
    dom0 = Client(xsd)
    dom0.write("/p", b"secret")
    dom0.set_perms("/p", ["n0", "r5"])  # domain 5 does not exist: entry ignored
    assert dom0.get_perms("/p") == ["n0", "r5"]  # still listed
    xsd.introduce_domain(5)
    assert errno_of(Client(xsd, domid=5).read, "/p") == errno.EACCES


def test_released_domain_entries_grant_nothing_to_a_new_domain_with_its_domid() -> None:
    xsd = Xenstored()
    dom0 = Client(xsd)
    xsd.introduce_domain(5)
    dom0.write("/p", b"for five")
    dom0.set_perms("/p", ["n0", "r5"])
    assert Client(xsd, domid=5).read("/p") == b"for five"
    xsd.release_domain(5)
    xsd.introduce_domain(5)  # a new domain reusing the domid
    d5 = Client(xsd, domid=5)
    assert errno_of(d5.read, "/p") == errno.EACCES
    assert dom0.get_perms("/p") == ["n0", "r5"]


def test_ignored_entry_stays_ignored_when_the_node_is_written_again() -> None:
    xsd = Xenstored()
    dom0 = Client(xsd)
    xsd.introduce_domain(5)
    dom0.write("/p", b"v1")
    dom0.set_perms("/p", ["n0", "r5"])
    xsd.release_domain(5)
    xsd.introduce_domain(5)
    dom0.write("/p", b"v2")  # newer than the new domain 5, but the mark was kept
    assert errno_of(Client(xsd, domid=5).read, "/p") == errno.EACCES
    dom0.set_perms("/p", ["n0", "r5"])  # granted again, explicitly
    assert Client(xsd, domid=5).read("/p") == b"v2"


def test_entry_naming_a_released_domain_is_ignored_in_watch_permissions() -> None:
    xsd = Xenstored()
    dom0 = Client(xsd)
    xsd.introduce_domain(5)
    dom0.write("/w", b"")
    dom0.set_perms("/w", ["n0", "r5"])
    xsd.release_domain(5)
    xsd.introduce_domain(5)
    d5 = Client(xsd, domid=5)
    d5.watch("/w", "t")
    d5.pump()
    d5.take_events()
    dom0.write("/w", b"changed")
    d5.pump()
    assert d5.take_events() == []


def test_set_perms_naming_a_non_existent_owner_is_enoent() -> None:
    xsd = Xenstored()
    dom0 = Client(xsd)
    dom0.write("/p", b"")
    assert errno_of(dom0.set_perms, "/p", ["n9"]) == errno.ENOENT
    assert errno_of(dom0.set_perms, "/missing", ["n9"]) == errno.ENOENT  # before the node
    assert dom0.get_perms("/p") == ["n0"]
    dom0.set_perms("/p", ["n0", "r9"])  # a non-owner entry is only ignored
    xsd.introduce_domain(9)
    dom0.set_perms("/p", ["n9"])


def test_domain_created_by_the_host_exists_before_its_introduction() -> None:
    host = {6}
    xsd = Xenstored(domain_exists=lambda domid: domid in host)
    dom0 = Client(xsd)
    dom0.write("/local/domain/6/device", b"")
    dom0.set_perms("/local/domain/6/device", ["n6", "r0"])  # before INTRODUCE, as libxl
    assert xsd.domain_exists(6) and not xsd.is_domain_introduced(6)
    xsd.introduce_domain(6)
    assert Client(xsd, domid=6).read("/local/domain/6/device") == b""
    host.discard(6)
    xsd.release_domain(6)
    assert not xsd.domain_exists(6)
    assert errno_of(dom0.set_perms, "/p", ["n6"]) == errno.ENOENT


def test_a_domain_only_the_host_created_stops_existing_when_the_host_destroys_it() -> None:
    host = {7}
    xsd = Xenstored(domain_exists=lambda domid: domid in host)
    dom0 = Client(xsd)
    dom0.write("/q", b"")
    dom0.set_perms("/q", ["n0", "r7"])
    assert xsd.domain_exists(7)
    host.discard(7)  # check_domains: never introduced, gone from the host
    assert not xsd.domain_exists(7)
    dom0.write("/elsewhere", b"")  # the store moves on (generation count)
    host.add(7)  # a new domain 7
    xsd.introduce_domain(7)
    assert errno_of(Client(xsd, domid=7).read, "/q") == errno.EACCES


def test_dom0_always_exists() -> None:
    xsd = Xenstored()
    dom0 = Client(xsd)
    dom0.write("/z", b"")
    dom0.set_perms("/z", ["n0", "r0"])
    assert xsd.domain_exists(0)
