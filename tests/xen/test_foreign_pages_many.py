"""Foreign-page addresses for a whole request at once (``ForeignPages.alloc_many``,
``free_many``): the addresses and the allocator state that one call per page
gives (the most recently freed address first, then fresh ones from the range),
and ENOMEM with nothing taken when the range has too few left."""

from __future__ import annotations

import errno
import random

from gntdma.xen.foreign import ForeignPages


def test_alloc_many_and_free_many_give_what_one_call_per_page_gives() -> None:
    exhausted = 0
    for seed in range(300):
        rng = random.Random(seed)
        many = ForeignPages(nr_pages=rng.choice([5, 50, 300]))
        one = ForeignPages(first_pfn=many.first_pfn, nr_pages=many.nr_pages)
        live: list[int] = []
        for _ in range(30):
            if rng.random() < 0.5:
                n = rng.randrange(0, 12)
                error, got = many.alloc_many(n)
                if one.nr_pages - len(one.in_use) < n:
                    assert (error, got) == (errno.ENOMEM, [])
                    exhausted += 1
                    continue
                want = [one.alloc() for _ in range(n)]
                assert [(0, a) for a in got] == want and error == 0
                live += got
            else:
                rng.shuffle(live)
                k = rng.randrange(0, len(live) + 1)
                give = live[:k] + ([many.first_pfn << 12 | 5] if rng.random() < 0.2 else [])
                live = live[k:]
                errors = [one.free(a) for a in give]
                assert many.free_many(give) == max(errors, default=0)
            assert many.in_use == one.in_use
    assert exhausted > 20
