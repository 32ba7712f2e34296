"""Helpers for testing stages directly (``Stage(config).run(ctx, **inputs)``)."""

from __future__ import annotations

from ._internal.board import RayBoard, start_board_actor


def ray_board() -> RayBoard:
    """A board held by a Ray actor, so metrics logged inside Ray Data or Ray Train workers
    reach the test: ``StageContext.for_testing(tmp, board=ray_board())``; read them back
    with ``ctx.metrics`` or ``board.history(stage_name)``. Needs a running Ray."""
    return RayBoard(start_board_actor())
