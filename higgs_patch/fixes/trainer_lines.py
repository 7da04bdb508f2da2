"""What each line of transformers' ``Trainer`` does with one micro-batch's loss under gradient accumulation.

The accumulation layer of trainer-compute-loss makes every update the mean over the micro-batches that
made it, on whatever line it runs; to do that without dividing twice it must know what the Trainer
itself divided by. That knowledge is data: one row per line, chosen once when the patch is installed,
and checked against the real Trainer on every tested line (tests/test_trainer_lines.py). A
transformers that no row covers is refused when the patch is installed, never guessed at.

In every line, ``training_step`` computes the loss, maybe divides it, backpropagates it and returns a
value for the logs; the logged loss of an update is the sum of those values over its micro-batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from packaging.specifiers import SpecifierSet
from packaging.version import Version

from ..errors import PatchError


@dataclass(frozen=True)
class Scaling:
    """What the Trainer divided one micro-batch's loss by: before backward, and in the value it logs.

    ``users``: the loss is scaled by the user's own code, from ``num_items_in_batch`` or as
    ``Trainer.loss_is_scaled_for_ga = True`` declares; not a mean to correct.
    """

    backward: float
    logged: float
    users: bool = False


@dataclass(frozen=True)
class TrainerLine:
    """One line's rule. ``divides``: what it divides a loss it takes for unscaled by, before backward
    (``nothing``; ``steps``, the accumulation steps; ``window``, the micro-batches of this update).
    ``scaled_when``: when it takes the loss for scaled already (a ``compute_loss_func`` is given, or the
    model takes loss kwargs: ``loss-kwargs``; ... and it counted ``num_items_in_batch``:
    ``counted-loss-kwargs``). ``logs``: the value it returns for the logs (``backward``, what it
    backpropagated; ``steps-unless-counted``, the loss / steps when it counted no items, else the loss).
    ``declared``: a ``loss_is_scaled_for_ga`` other than None on the Trainer decides instead.
    """

    versions: SpecifierSet
    divides: Literal["nothing", "steps", "window"]
    scaled_when: Literal["loss-kwargs", "counted-loss-kwargs"]
    logs: Literal["backward", "steps-unless-counted"]
    declared: bool = False

    def scaling(self, trainer: Any, num_items_in_batch: Any) -> Scaling:
        counted = num_items_in_batch is not None
        given_function = getattr(trainer, "compute_loss_func", None) is not None
        declared = getattr(trainer, "loss_is_scaled_for_ga", None) if self.declared else None
        if declared is not None:
            scaled = users = bool(declared)
        else:
            takes_kwargs = trainer.model_accepts_loss_kwargs and (counted or self.scaled_when == "loss-kwargs")
            scaled = given_function or takes_kwargs
            # A compute_loss_func given the count divides by it; a Higgs Audio model given it ignores it.
            users = given_function and counted
        steps = trainer.args.gradient_accumulation_steps
        divisor = {
            "nothing": 1,
            "steps": steps,
            "window": getattr(trainer, "current_gradient_accumulation_steps", steps),
        }[self.divides]
        backward = 1 if scaled else divisor
        logged = backward if self.logs == "backward" else (1 if counted else steps)
        return Scaling(backward=backward, logged=logged, users=users)


LINES = (
    # 4.46, 4.47: never divides before backward; divides only the logged value, and only without a count
    # (4.47 counts whenever the batch has labels).
    TrainerLine(SpecifierSet(">=4.46,<4.48"), "nothing", "loss-kwargs", "steps-unless-counted"),
    # 4.48 to 4.52: divides by the accumulation steps, even an epoch's short last window.
    TrainerLine(SpecifierSet(">=4.48,<4.53"), "steps", "loss-kwargs", "backward"),
    # 4.53, 4.54: the same, but a model taking loss kwargs is divided too when nothing was counted.
    TrainerLine(SpecifierSet(">=4.53,<4.55"), "steps", "counted-loss-kwargs", "backward"),
    # 4.55 on: divides by the micro-batches of the update (exact for a mean loss on every window).
    TrainerLine(SpecifierSet(">=4.55,<5.19"), "window", "counted-loss-kwargs", "backward"),
    # 5.19 on: the same, unless the Trainer (a subclass) sets loss_is_scaled_for_ga.
    TrainerLine(SpecifierSet(">=5.19"), "window", "counted-loss-kwargs", "backward", declared=True),
)


def line_of(version: str) -> TrainerLine:
    """The row of ``version``; a :class:`PatchError` naming the covered lines for one no row covers."""
    found = [line for line in LINES if line.versions.contains(Version(version), prereleases=True)]
    if len(found) != 1:
        covered = ", ".join(str(line.versions) for line in LINES)
        raise PatchError(
            f"transformers {version}: the accumulation fix knows what the Trainer does with the loss on "
            f"{covered} only; install one of those (compat/matrix.toml lists the tested stacks)"
        )
    return found[0]
