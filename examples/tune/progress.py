"""Progress output of the tuner and its summary table.

:class:`Progress` counts the study's trials (done, running, pruned, failed, waiting) and the best
final loss so far, and shows them as a tqdm bar on a TTY or as one line per change otherwise.
"""
from __future__ import annotations

import math
import sys

__all__ = ["Progress", "summary_table", "missing_lines", "count_states"]


def count_states(studies) -> dict:
    """Counts per state over the candidate trials of ``studies`` and the best finished value so far."""
    import optuna

    S = optuna.trial.TrialState
    counts = dict(done=0, running=0, pruned=0, failed=0, waiting=0)
    best = None
    for study in studies:
        for t in study.get_trials(deepcopy=False):
            if "key" not in t.user_attrs or "duplicate_of" in t.user_attrs:
                continue
            if t.state == S.FAIL and "error" not in t.user_attrs:
                continue  # a lost worker's trial; its retry is counted instead
            name = {S.COMPLETE: "done", S.RUNNING: "running", S.PRUNED: "pruned", S.FAIL: "failed",
                    S.WAITING: "waiting"}[t.state]
            counts[name] += 1
            if t.state == S.COMPLETE and t.value is not None and math.isfinite(t.value) \
                    and (best is None or t.value < best[1]):
                best = (t.user_attrs["key"], t.value)
    counts["best"] = best
    return counts


class Progress:
    """Progress of one tuner process: a tqdm bar when stderr is a TTY, else a line whenever the counts change."""

    def __init__(self, total: int, stream=None):
        self.total, self.stream = total, stream or sys.stderr
        self.last = None
        self.bar = None
        if self.stream.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="tune", unit="trial", file=self.stream)

    @staticmethod
    def _line(c: dict) -> str:
        best = f"best {c['best'][0]} {c['best'][1]:.4f}" if c["best"] else "best -"
        return (f"done {c['done']} running {c['running']} pruned {c['pruned']} failed {c['failed']} "
                f"waiting {c['waiting']} | {best}")

    def update(self, studies) -> None:
        """Refresh from the studies' trials."""
        c = count_states(studies)
        line = self._line(c)
        if line == self.last:
            return
        self.last = line
        finished = c["done"] + c["pruned"] + c["failed"]
        if self.bar is not None:
            self.bar.n = finished
            self.bar.set_postfix_str(line)
            self.bar.refresh()
        else:
            print(f"tune: {finished}/{self.total} finished | {line}", file=self.stream, flush=True)

    def note(self, message: str) -> None:
        """One event line (a rung started, a trial failed or was taken over)."""
        if self.bar is not None:
            self.bar.write(f"tune: {message}", file=self.stream)
        else:
            print(f"tune: {message}", file=self.stream, flush=True)

    def close(self) -> None:
        """Close the bar."""
        if self.bar is not None:
            self.bar.close()


def _fmt(x: float) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.4f}"


def missing_lines(result) -> list[str]:
    """One line per family/tier of ``result.missing``: ``no choice for F/bT: <why>``."""
    lines = []
    for f, t in result.missing:
        states = {s.state for s in result.trials if (s.candidate.family, s.candidate.tier) == (f, t)}
        why = "every candidate failed" if states <= {"failed"} else "every candidate that reached the last rung failed"
        lines.append(f"no choice for {f}/b{t}: {why}")
    return lines


def summary_table(result) -> str:
    """One line per candidate of a :class:`~examples.tune.tuner.TuneResult`: rung losses, state, choice."""
    n = len(result.rungs)
    head = ["family", "tier", "scale", "state"] + [f"rung{k}@{b}" for k, b in enumerate(result.rungs)] + \
        ["extrap", "chosen"]
    rows = [head]
    for s in result.trials:
        c = s.candidate
        chosen = result.choices.get((c.family, c.tier))
        losses = list(s.rung_losses) + [float("nan")] * (n - len(s.rung_losses))
        rows.append([c.family, str(c.tier), f"{c.scale:.4g}", s.state] + [_fmt(v) for v in losses] +
                    [_fmt(s.extrapolated_loss), "*" if chosen is not None and chosen.key == c.key else ""])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    lines += missing_lines(result)
    for (f, t), edge in sorted(result.at_edge.items()):
        lines.append(f"{f}/b{t}: the choice is the {edge} candidate of the grid; the best rate may lie beyond it")
    return "\n".join(lines)
