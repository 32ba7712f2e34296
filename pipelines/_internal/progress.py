"""Terminal progress while stages run, and the final results table."""

from __future__ import annotations

import sys
import time


def _fmt_eta(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def progress_line(name: str, kind: str, p: dict | None, started: float, now: float) -> str:
    elapsed = now - started
    if not p:
        return f"  {name:<18} {kind:<22} running  {elapsed:6.1f}s"
    done, total, unit = p["done"], p["total"], p["unit"]
    if total:
        frac = min(1.0, done / total)
        eta = f"  ETA {_fmt_eta(elapsed * (1 - frac) / frac)}" if 0 < frac < 1 else ""
        return (f"  {name:<18} {kind:<22} {unit} {done:g}/{total:g} {100 * frac:3.0f}%"
                f"  {elapsed:6.1f}s{eta}")
    return f"  {name:<18} {kind:<22} {unit} {done:g}  {elapsed:6.1f}s"


class Display:
    """Writes to stderr: a line per event, and per running stage a progress line at most
    every ``every`` seconds (rewritten in place on a terminal)."""

    def __init__(self, enabled: bool = True, stream=None, every: float = 5.0):
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = self.enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.every = 0.5 if self.tty else every
        self.running: dict[str, tuple[str, float]] = {}
        self.last: dict[str, float] = {}
        self._status_shown = False

    def event(self, text: str) -> None:
        if not self.enabled:
            return
        self._clear()
        print(text, file=self.stream, flush=True)

    def start(self, name: str, kind: str, reason: str) -> None:
        self.running[name] = (kind, time.time())
        self.event(f"> {name} ({kind}) started: {reason}")

    def finish(self, name: str, status: str, seconds: float, extra: str = "") -> None:
        self.running.pop(name, None)
        mark = {"ran": "ok", "cached": "cached", "failed": "FAILED"}.get(status, status)
        self.event(f"{mark:>6} {name} ({seconds:.1f}s){extra}")

    def update(self, progress: dict[str, dict]) -> None:
        if not self.enabled or not self.running:
            return
        now = time.time()
        lines = []
        for name, (kind, started) in self.running.items():
            if self.tty or now - self.last.get(name, started) >= self.every:
                self.last[name] = now
                lines.append(progress_line(name, kind, progress.get(name), started, now))
        if not lines:
            return
        if self.tty:
            self._clear()
            self.stream.write(" | ".join(line.strip() for line in lines)[:200])
            self.stream.flush()
            self._status_shown = True
        else:
            for line in lines:
                print(line, file=self.stream, flush=True)

    def _clear(self) -> None:
        if self.tty and self._status_shown:
            self.stream.write("\r\x1b[K")
            self._status_shown = False


def results_table(result, stream=None, max_metrics: int = 5) -> None:
    from rich.console import Console
    from rich.table import Table
    table = Table(title=f"pipeline '{result.pipeline}'  run {result.run_id}", title_justify="left")
    for col in ("stage", "kind", "status", "time", "key", "metrics"):
        table.add_column(col, no_wrap=col != "metrics")
    for s in result.stages:
        metrics = ", ".join(f"{k}={v:.4g}" for k, v in list(s.metrics.items())[:max_metrics])
        table.add_row(s.name, s.kind, s.status, f"{s.seconds:.1f}s", s.key[:12], metrics)
    Console(file=stream or sys.stdout, width=160).print(table)
    for stage, v in result.registered.items():
        print(f"{stage}: {'registered' if v['created'] else 'already registered'} as "
              f"models:/{v['name']}/{v['version']}", file=stream or sys.stdout)
