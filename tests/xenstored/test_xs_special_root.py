"""Special events and watches on "/" (C xenstored, RELEASE-4.17.7).

xenstored_domain.c fires ``@introduceDomain`` (introduce_domain) and
``@releaseDomain`` (destroy_domain, domain_cleanup) with ``fire_watches(...,
exact=true, ...)``; xenstored_watch.c fire_watches then matches a watch only when
``streq(name, watch->node)``: ``is_child`` (which takes every name as a child of
"/") is used for non-exact changes only. So a watch on "/" does not get the
special events, only a watch on the special path itself does.
"""

from __future__ import annotations

from xs_helpers import Client

from gntdma.xenstored import Xenstored


def test_root_watch_does_not_get_special_events_fire_watches_exact() -> None:
    xsd = Xenstored(domain_exists=lambda d: True)
    dom0 = Client(xsd)
    dom0.watch("/", "root")
    dom0.watch("@introduceDomain", "intro")
    dom0.watch("@releaseDomain", "rel")
    dom0.take_events()  # the first event of each watch
    xsd.introduce_domain(1)
    xsd.release_domain(1)
    dom0.pump()
    events = dom0.take_events()
    assert ("@introduceDomain", "intro") in events
    assert ("@releaseDomain", "rel") in events
    assert all(path.startswith("/") for path, token in events if token == "root"), events
    assert ("@introduceDomain", "root") not in events
    assert ("@releaseDomain", "root") not in events
