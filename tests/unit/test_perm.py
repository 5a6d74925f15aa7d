"""Permission conflicts (blkfs/block/perm.py): the one-pass test agrees with QEMU's
pairwise definition (bdrv_a_allow_b), whatever the uses."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from blkfs.block.perm import ALL, NO_PERM, Perm, Role, Use, child_perm, conflict

perms = st.integers(0, ALL.value).map(Perm)
shares = st.one_of(st.just(ALL), st.just(ALL & ~Perm.WRITE), perms)  # mostly generous
uses = st.lists(st.tuples(perms, shares), max_size=20).map(  # past FEW_USES too
    lambda pairs: [Use(perm, shared, f"user {i}") for i, (perm, shared) in enumerate(pairs)]
)


@given(uses)
def test_a_conflict_is_found_exactly_when_two_uses_disagree(given_uses: list[Use]) -> None:
    pairwise = [(a, b) for a in given_uses for b in given_uses if a is not b and a.perm & ~b.shared]
    found = conflict(given_uses)
    assert (found is not None) == bool(pairwise)
    if pairwise:  # the message names the first such pair, as before
        a, b = pairwise[0]
        assert found is not None and a.who in found and b.who in found


def test_a_backing_file_is_written_by_nobody_while_its_overlay_is_read() -> None:
    """Even an overlay whose users share write (a read-only backend) refuses a writer of its
    backing file while they read it; only an overlay nobody reads (a commit's own chain,
    through the job's filter) lets the base be written."""
    read, write = Perm.CONSISTENT_READ, Perm.WRITE
    assert child_perm(Role.COW, False, read, ALL) == (read, read | Perm.WRITE_UNCHANGED)
    assert (
        child_perm(Role.COW, True, read | write | Perm.RESIZE, ALL & ~write)[1] & write == NO_PERM
    )
    assert (
        child_perm(Role.COW, False, NO_PERM, ALL)[1] & (write | Perm.RESIZE) == write | Perm.RESIZE
    )
