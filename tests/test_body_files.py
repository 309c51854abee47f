"""The memory files kept between big bodies (`router/body_files.py`), on real memory files."""

from __future__ import annotations

import os

import pytest

from clearml_umem.router.body_files import BodyFiles


def _size(fd: int) -> int:
    return os.fstat(fd).st_size


def test_a_file_given_back_is_lent_again_grown_when_short_never_shrunk() -> None:
    files = BodyFiles(keep=2)
    fd = files.take(1000, now=0.0)
    assert _size(fd) == 1000
    assert files.give_back(fd, now=1.0)
    assert files.take(5000, now=2.0) == fd and _size(fd) == 5000
    assert files.give_back(fd, now=3.0)
    assert files.take(10, now=4.0) == fd and _size(fd) == 5000, "a body is its length; the file keeps its pages"
    os.close(fd)


def test_no_more_than_keep_files_are_kept_and_the_last_given_back_is_lent_first() -> None:
    files = BodyFiles(keep=2)
    fds = [files.take(100, now=0.0) for _ in range(3)]
    assert [files.give_back(fd, now=1.0) for fd in fds] == [True, True, False]
    os.close(fds[2])
    assert files.kept == 2
    assert files.take(100, now=2.0) == fds[1]
    for fd in (fds[0], fds[1]):
        os.close(fd)


def test_the_kept_files_hold_no_more_than_keep_bytes_whatever_the_body_limit() -> None:
    files = BodyFiles(keep=4, keep_bytes=10_000)
    big, small, other = files.take(8_000, now=0.0), files.take(2_000, now=0.0), files.take(1_000, now=0.0)
    assert files.give_back(big, now=1.0) and files.give_back(small, now=1.0)
    assert not files.give_back(other, now=1.0), "a third file would pass keep_bytes"
    assert files.kept == 2 and files.kept_bytes == 10_000
    huge = files.take(20_000, now=2.0)  # the small one, grown
    assert huge == small and not files.give_back(huge, now=3.0)
    assert files.kept_bytes == 8_000
    for fd in (big, small, other):
        os.close(fd)


def test_a_file_forgotten_or_never_lent_is_not_kept() -> None:
    files = BodyFiles(keep=4)
    fd = files.take(100, now=0.0)
    files.forget(fd)
    assert not files.give_back(fd, now=1.0)
    other = os.memfd_create("other")
    assert not files.give_back(other, now=1.0)
    lent = files.take(100, now=2.0)
    assert files.give_back(lent, now=3.0) and not files.give_back(lent, now=3.0), "given back twice, kept once"
    assert files.kept == 1
    for each in (fd, other, lent):
        os.close(each)


def test_a_new_file_is_sized_for_its_body_even_where_a_closed_one_had_its_number() -> None:
    """A file closed without coming back (its router's loop gone) leaves its size behind; the next
    new file may get its descriptor number and must still be as long as its body."""
    files = BodyFiles()
    fd = files.take(1000, now=0.0)
    os.close(fd)
    again = files.take(5000, now=1.0)
    assert _size(again) == 5000
    os.close(again)


@pytest.mark.parametrize("keep", [0, 3])
def test_kept_files_are_due_to_go_after_idle_s_and_drain_hands_them_over(keep: int) -> None:
    files = BodyFiles(keep=keep, idle_s=10.0)
    fds = [files.take(100, now=0.0) for _ in range(3)]
    kept = {fd for fd in fds if files.give_back(fd, now=5.0)}
    assert len(kept) == keep
    if keep:
        assert files.idle(now=5.0) == 10.0
        kept.discard(files.take(100, now=12.0))  # a body came: the countdown starts again from it
        assert files.idle(now=14.0) == 8.0
        assert files.idle(now=22.0) == 0.0
    assert files.idle(now=100.0) == 0.0
    assert set(files.drain()) == kept and files.kept == 0
    for fd in fds:
        os.close(fd)
