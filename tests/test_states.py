"""The state machine table the repository enforces."""

from __future__ import annotations

import pytest

from sessionmgr.states import FINAL_STATUSES, TRANSITIONS, SessionStatus, can_transition
from sessionmgr.transitions import check_transition


def test_final_statuses_are_final() -> None:
    for status in FINAL_STATUSES:
        assert TRANSITIONS[status] == frozenset()


@pytest.mark.parametrize(
    ("src", "dst"),
    [("pending", "active"), ("pending", "failed"), ("active", "ending"), ("ending", "ended")],
)
def test_the_documented_path_is_allowed(src: str, dst: str) -> None:
    assert can_transition(SessionStatus(src), SessionStatus(dst))
    check_transition(src, dst)


@pytest.mark.parametrize(
    ("src", "dst"), [("ended", "active"), ("failed", "pending"), ("active", "pending")]
)
def test_the_repository_refuses_undeclared_transitions(src: str, dst: str) -> None:
    with pytest.raises(AssertionError, match="not a transition"):
        check_transition(src, dst)
