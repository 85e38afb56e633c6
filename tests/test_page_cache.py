"""KernelView's answers for each open, without FUSE: what the kernel may still hold of
a path decides whether its pages are kept and whether reads go past them."""

from __future__ import annotations

import pytest

from cvmfs_client import page_cache
from cvmfs_client.page_cache import KernelView

TIMEOUT = 60.0


def test_a_path_reopened_with_the_same_content_keeps_its_pages_and_new_content_drops_them() -> None:
    view = KernelView(TIMEOUT)
    assert view.size_to_tell("/f", 10) == 10
    assert view.opening("/f", "old", 10, now=1.0) == (False, False)  # nothing cached yet
    view.closed("/f", "old", 10, before_switch=False, now=2.0)
    assert view.opening("/f", "old", 10, now=3.0) == (True, False)
    view.closed("/f", "old", 10, before_switch=False, now=4.0)
    assert view.opening("/f", "new", 10, now=5.0) == (False, False)  # same size, other bytes


def test_a_size_the_kernel_was_told_for_another_revision_means_direct_io() -> None:
    view = KernelView(TIMEOUT)
    view.size_to_tell("/f", 10)
    assert view.opening("/f", "new", 42, now=1.0) == (False, True)


def test_while_another_revision_is_open_new_opens_read_past_the_cache_at_the_largest_size() -> None:
    view = KernelView(TIMEOUT)
    view.size_to_tell("/f", 10)
    view.opening("/f", "old", 10, now=1.0)
    assert view.size_to_tell("/f", 6) == 10  # not cutting the old handle at 6
    assert view.opening("/f", "new", 6, now=2.0) == (False, True)


def test_after_an_old_handle_closes_the_size_is_unsure_for_one_attribute_timeout() -> None:
    view = KernelView(TIMEOUT)
    view.size_to_tell("/f", 10)
    view.opening("/f", "old", 10, now=1.0)
    view.size_to_tell("/f", 42)
    view.closed("/f", "old", 10, before_switch=True, now=2.0)
    assert view.opening("/f", "new", 42, now=3.0) == (False, True)
    view.closed("/f", "new", 42, before_switch=False, now=4.0)
    assert view.opening("/f", "new", 42, now=2.0 + TIMEOUT + 1) == (False, False)


def test_a_forgotten_size_is_unsure_only_shortly_after_a_switch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(page_cache, "REMEMBERED", 2)
    view = KernelView(TIMEOUT)
    for path in ("/a", "/b", "/c"):  # /a is forgotten
        view.size_to_tell(path, 1)
    assert view.opening("/a", "x", 1, now=10.0)[1] is False  # no switch: sizes are right
    view.closed("/a", "x", 1, before_switch=False, now=11.0)
    for path in ("/b", "/c", "/d"):
        view.size_to_tell(path, 1)
    view.switched(now=20.0)
    assert view.opening("/a", "x", 1, now=21.0)[1] is True
    view.closed("/a", "x", 1, before_switch=False, now=22.0)
    assert view.opening("/a", "x", 1, now=20.0 + TIMEOUT + 1)[1] is False
