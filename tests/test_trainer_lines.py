"""The per-line table of what the Trainer does with a micro-batch's loss, against the installed Trainer.

``higgs_patch.fixes.trainer_lines`` says, for the installed transformers, what ``training_step``
divides each micro-batch's loss by before backward and in the value it logs. Here the real Trainer
trains a small model alone (no patch), in every way of training that changes those divisors: a forward
with or without loss kwargs, batches with or without ``labels``, a ``compute_loss_func``, full and
short windows, and (where the line has it) ``loss_is_scaled_for_ga``. Each update and each logged loss
must be what the table predicts: ``n / backward`` times the mean update of its n micro-batches, and
their mean loss times ``n / logged``. The table is the accumulation fix's only knowledge of the line.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import Trainer, TrainerCallback, TrainingArguments

from higgs_patch.fixes import trainer_lines

pytestmark = pytest.mark.core

LR = 0.5
LINE = trainer_lines.line_of(transformers.__version__)


class MeanLoss(torch.nn.Module):
    """A model whose forward takes no loss kwargs (as HiggsAudioModel's) and returns a mean loss."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(4, 1)

    def forward(self, x, labels=None, target=None):
        DRAWN.extend(tuple(row.tolist()) for row in x)
        prediction = self.linear(x).squeeze(-1)
        wanted = labels if labels is not None else target
        return {"prediction": prediction, "loss": None if wanted is None else squared_error(prediction, wanted)}


class TakesKwargs(MeanLoss):
    """A user's wrapper module: ``forward(**kwargs)``; like Higgs Audio's it ignores num_items_in_batch."""

    def forward(self, **kwargs):
        kwargs.pop("num_items_in_batch", None)
        return super().forward(**kwargs)


class TakesLossKwargs(MeanLoss):
    """``forward(..., **loss_kwargs)``: what transformers 4.46 looks for."""

    def forward(self, x, labels=None, target=None, **loss_kwargs):
        return super().forward(x, labels, target)


SEEN: list[float] = []  # the loss of every micro-batch, in order
DRAWN: list[tuple] = []  # the inputs of every micro-batch, in order


def squared_error(prediction, wanted):
    loss = ((prediction - wanted.float()) ** 2).mean()
    SEEN.append(float(loss.detach()))
    return loss


def a_compute_loss_func(outputs, labels, num_items_in_batch=None):
    """A mean, whatever the count (transformers >= 4.55 calls it without labels too: the model's loss)."""
    return outputs["loss"] if labels is None else squared_error(outputs["prediction"], labels)


def dataset(count: int, labels: bool) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    key = "labels" if labels else "target"
    return [{"x": torch.randn(4, generator=g), key: torch.randn((), generator=g)} for _ in range(count)]


class Recorded(Trainer):
    """The real Trainer; records what the table predicts for each micro-batch, as the fix would read it."""

    declared = None

    def training_step(self, model, inputs, num_items_in_batch=None, *args, **kwargs):
        self.predicted.append(LINE.scaling(self, num_items_in_batch))
        return super().training_step(model, inputs, num_items_in_batch, *args, **kwargs)


class Updates(TrainerCallback):
    def __init__(self, model) -> None:
        self.model = model
        self.params = [flat(model)]
        self.seen = [0]

    def on_step_end(self, args, state, control, **kwargs):
        self.params.append(flat(self.model))
        self.seen.append(len(SEEN))


def flat(model) -> torch.Tensor:
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()


def mean_update(params: torch.Tensor, samples: list[dict]) -> torch.Tensor:
    """One SGD step's change on the mean loss of ``samples``, from ``params``."""
    model = MeanLoss()
    torch.nn.utils.vector_to_parameters(params, model.parameters())
    losses = [((model.linear(s["x"]).squeeze(-1) - next(v for k, v in s.items() if k != "x")) ** 2) for s in samples]
    torch.stack(losses).mean().backward()
    return torch.cat([-LR * p.grad.flatten() for p in model.parameters()])


# (micro-batches, accumulation steps, Trainer arguments): full windows, and a short one (an epoch of 2, k=3)
WINDOWS = {"full windows": (4, 2, dict(max_steps=2)), "a short window": (2, 3, dict(num_train_epochs=1))}
MODELS = {"no loss kwargs": MeanLoss, "**kwargs": TakesKwargs, "**loss_kwargs": TakesLossKwargs}


def train(tmp_path, model, samples, steps, trainer_class=Recorded, **overrides):
    SEEN.clear()
    DRAWN.clear()
    updates = Updates(model)
    args = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], save_strategy="no", remove_unused_columns=False,
        disable_tqdm=True, seed=0, logging_steps=1, per_device_train_batch_size=1, gradient_accumulation_steps=steps,
        optim="sgd", learning_rate=LR, lr_scheduler_type="constant", max_grad_norm=0, dataloader_drop_last=False,
        **{k: v for k, v in overrides.items() if k != "compute_loss_func"},
    )
    trainer = trainer_class(model=model, args=args, train_dataset=samples, callbacks=[updates],
                            compute_loss_func=overrides.get("compute_loss_func"))
    trainer.predicted = []
    trainer.train()
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    by_input = {tuple(s["x"].tolist()): s for s in samples}
    return trainer, updates, logged, [by_input[x] for x in DRAWN]


def disagreements(trainer, updates, logged, samples_seen) -> list[str]:
    """Each update or logged loss the table did not predict, described; [] when it predicted all."""
    found, start = [], 0
    for step, end in enumerate(updates.seen[1:]):
        n = end - start
        predicted = trainer.predicted[end - 1]  # the window's closing micro-batch
        assert all(trainer.predicted[i] == predicted for i in range(start, end)), "one rule per window"
        exact = mean_update(updates.params[step], samples_seen[start:end])
        got = updates.params[step + 1] - updates.params[step]
        if not torch.allclose(got, exact * n / predicted.backward, rtol=1e-4, atol=1e-7):
            ratio = float(got.norm() / exact.norm())
            found.append(f"update {step + 1} ({n} micro-batches): {ratio:.3f}x the mean's, table: {n / predicted.backward:.3f}x")
        mean_loss = sum(SEEN[start:end]) / n
        if logged[step] != pytest.approx(mean_loss * n / predicted.logged, rel=1e-3, abs=1e-4):
            found.append(f"update {step + 1}: logged {logged[step]:.4f}, table: {mean_loss * n / predicted.logged:.4f}")
        start = end
    return found


@pytest.mark.parametrize("window", WINDOWS, ids=list(WINDOWS))
@pytest.mark.parametrize("model_class", MODELS.values(), ids=list(MODELS))
@pytest.mark.parametrize("labels", [True, False], ids=["labels", "no labels key"])
def test_the_table_predicts_what_the_trainer_alone_does(tmp_path, window, model_class, labels):
    count, steps, arguments = WINDOWS[window]
    samples = dataset(count, labels)
    assert disagreements(*train(tmp_path, model_class(), samples, steps, **arguments)) == []


@pytest.mark.parametrize("window", WINDOWS, ids=list(WINDOWS))
@pytest.mark.parametrize("labels", [True, False], ids=["labels", "no labels key"])
def test_the_table_predicts_the_trainer_with_a_compute_loss_func(tmp_path, window, labels):
    count, steps, arguments = WINDOWS[window]
    samples = dataset(count, labels)
    assert disagreements(*train(tmp_path, MeanLoss(), samples, steps, compute_loss_func=a_compute_loss_func, **arguments)) == []


class DeclaresScaled(Recorded):
    loss_is_scaled_for_ga = True


class DeclaresUnscaled(Recorded):
    loss_is_scaled_for_ga = False


@pytest.mark.parametrize("trainer_class", [DeclaresScaled, DeclaresUnscaled], ids=["scaled", "unscaled"])
@pytest.mark.parametrize("model_class", [MeanLoss, TakesKwargs], ids=["no loss kwargs", "**kwargs"])
def test_the_table_predicts_a_trainer_that_declares_its_loss_scaled_or_not(tmp_path, trainer_class, model_class):
    """transformers >= 5.19 reads ``loss_is_scaled_for_ga``; before, the attribute changes nothing."""
    count, steps, arguments = WINDOWS["a short window"]
    samples = dataset(count, True)
    assert disagreements(*train(tmp_path, model_class(), samples, steps, trainer_class=trainer_class, **arguments)) == []
