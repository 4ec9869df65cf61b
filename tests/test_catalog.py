"""The catalogue's heap settling: a server process freezes what its loads left
out of the cyclic collector's reach, and still frees the versions a reload
replaces."""

from __future__ import annotations

import gc
import weakref

from recserve.models import create
from recserve.serving import Catalog


def test_a_settled_heap_is_frozen_and_replaced_versions_are_still_freed(small, tmp_path):
    for algo in ("popularity", "itemknn"):
        create(algo).fit(small).save(tmp_path, algo, dataset=small)
    plain = Catalog(tmp_path)  # a library user's catalogue leaves the GC alone
    plain.start()
    assert plain.wait(60) and gc.get_freeze_count() == 0
    plain.close()
    catalog = Catalog(tmp_path, settle_heap=True)
    try:
        catalog.start()
        assert catalog.wait(60)
        assert gc.get_freeze_count() > 0
        model = catalog.get("itemknn").model
        model.cycle = model  # the old version dies in a reference cycle
        old = weakref.ref(model)
        del model
        create("itemknn", k=5).fit(small).save(tmp_path, "itemknn", dataset=small)
        switched, refused = catalog.reload()
        assert [s.name for s in switched] == ["itemknn"] and not refused
        assert old() is None  # collected although it was frozen
        assert gc.get_freeze_count() > 0  # and the heap settled again
    finally:
        catalog.close()
        gc.unfreeze()
