"""Helpers for testing stages directly (``Stage(config).run(ctx, **inputs)``)."""

from __future__ import annotations

from ._internal.board import RayBoard, start_board_actor


class _ReadableRayBoard(RayBoard):
    def history(self, stage: str) -> list[tuple[str, float, int | None]]:
        import ray
        return ray.get(self.actor.take_history.remote(stage))


def ray_board() -> _ReadableRayBoard:
    """A board held by a Ray actor, so metrics logged inside Ray Data or Ray Train workers
    reach the test: ``StageContext.for_testing(tmp, board=ray_board())``; read them back
    with ``board.history(stage_name)`` or ``ctx.metrics``. Needs a running Ray."""
    return _ReadableRayBoard(start_board_actor())
