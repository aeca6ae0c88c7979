"""Planning a run to a wall-time budget (``--budget 8m``).

The trainer measures what it can before committing to a schedule: the fixed costs already
spent (decoding, trunk caches, the zero-shot evaluation), the cost of one evaluation, and
the seconds per training step over the first steps. :func:`plan_steps` turns those into the
number of steps the cosine schedule runs, so it reaches its end when the budget does,
whatever the CPU (a CPU without native bf16 simply gets fewer steps).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Plan:
    """What the planner decided, logged and kept in ``metrics.jsonl`` / ``eval.json``."""

    budget_s: float
    spent_s: float  #: wall time already used when planning (setup, caches, zero-shot eval, probe steps)
    step_s: float  #: measured seconds per training step
    eval_s: float  #: measured seconds per epoch of evaluation
    reserve_s: float  #: kept for the final evaluation and saving
    steps_per_epoch: int
    total_steps: int
    epochs: int
    capped: str  #: "" or why the plan is not what the budget alone allows ("max epochs", "minimum")

    def as_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        note = f" ({self.capped})" if self.capped else ""
        return (f"budget {self.budget_s:.0f} s: {self.spent_s:.0f} s spent on setup; {self.step_s * 1000:.0f} ms/step, "
                f"{self.eval_s:.1f} s of evaluation per epoch -> {self.total_steps} steps = {self.epochs} epochs of "
                f"{self.steps_per_epoch} steps{note}, ending about {self.spent_s + self.total_steps * (self.step_s + self.eval_s / self.steps_per_epoch) + self.reserve_s:.0f} s in")


def plan_steps(*, budget_s: float, spent_s: float, step_s: float, eval_s: float, reserve_s: float,
               steps_per_epoch: int, max_epochs: int, done_steps: int = 0, min_steps: int = 1) -> Plan:
    """How many training steps fit in what is left of ``budget_s``.

    Each epoch costs ``steps_per_epoch * step_s + eval_s``; ``reserve_s`` is kept for the end.
    The result is at least ``max(min_steps, done_steps)`` and at most ``max_epochs`` epochs.

    Raises:
        ValueError: on non-positive step time or steps per epoch.
    """
    if step_s <= 0 or steps_per_epoch <= 0:
        raise ValueError(f"need step_s > 0 and steps_per_epoch > 0, got {step_s}, {steps_per_epoch}")
    left = budget_s - spent_s - reserve_s
    per_step = step_s + max(0.0, eval_s) / steps_per_epoch
    # steps already done were paid for in spent_s
    more = math.floor(left / per_step) if left > 0 else 0
    steps, capped = done_steps + more, ""
    if steps > max_epochs * steps_per_epoch:
        steps, capped = max_epochs * steps_per_epoch, "max epochs"
    if more <= 0 or steps < min_steps:
        steps, capped = max(steps, min_steps), "minimum: the budget is spent"
    return Plan(budget_s=budget_s, spent_s=spent_s, step_s=step_s, eval_s=eval_s, reserve_s=reserve_s,
                steps_per_epoch=steps_per_epoch, total_steps=int(steps),
                epochs=math.ceil(steps / steps_per_epoch), capped=capped)
