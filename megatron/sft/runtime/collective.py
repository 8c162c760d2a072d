"""Failures every rank hears about: one rank's bad file must not leave its peers hanging in the
next collective or dying with ``Connection closed by peer``.

:func:`on_every_rank` runs a step that may fail for a reason of the user's (a truncated
checkpoint file, a full disk) on each rank, then the ranks exchange outcomes: when any failed,
every rank raises the same one-line error, naming the rank. Without a process group (or in a
world of one) it just runs the step.
"""

from __future__ import annotations

from typing import Callable, TypeVar

R = TypeVar("R")


class PeerFailure(ValueError):
    """Another rank failed a step this rank took part in; the message is that rank's."""


def on_every_rank(step: Callable[[], R], *, gather: bool = False,
                  expected: tuple = (ValueError, OSError)):
    """Run ``step`` here and return its result (with ``gather``: every rank's, in rank order;
    keep those small, they are pickled). If it raised one of ``expected`` on any rank, that rank
    re-raises its own error and every other rank raises :class:`PeerFailure` with the same text
    (the lowest failing rank's)."""
    import torch.distributed as dist

    error, result = None, None
    try:
        result = step()
    except expected as exc:
        error = exc
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        if error is not None:
            raise error
        return [result] if gather else result
    outcomes: list = [None] * dist.get_world_size()
    mine = (None if error is None else str(error), result if gather else None)
    dist.all_gather_object(outcomes, mine)
    failed = [(r, msg) for r, (msg, _) in enumerate(outcomes) if msg is not None]
    if failed:
        if error is not None:
            raise error
        first, msg = failed[0]
        raise PeerFailure(f"rank {first}: {msg}")
    return [res for _, res in outcomes] if gather else result
