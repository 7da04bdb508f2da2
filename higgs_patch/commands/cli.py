"""The ``higgs-patch`` command: list, doctor, smoke, fingerprint, convert.

A thin click layer: the work is in :mod:`higgs_patch.doctor` and :mod:`higgs_patch.smoke`, imported
by the command that needs them, so ``higgs-patch list`` and ``--help`` import no torch.
Exit codes: 0 all good, 1 a problem found, 2 a usage error.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from typing import Any

import click

from .. import __version__, engine
from . import memory as memory_model
from ..errors import OptionError, PatchError

log = logging.getLogger("higgs_patch")

MARKS = {"ok": "✓", "warn": "!", "fail": "✗"}
ASCII_MARKS = {"ok": "ok", "warn": "!", "fail": "x"}


class _EchoHandler(logging.Handler):
    """Log records to stderr through click, which finds the stream current at each call."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            click.echo(self.format(record), err=True)
        except Exception:
            self.handleError(record)


def _configure_logging(verbose: int) -> None:
    handler = next((h for h in log.handlers if isinstance(h, _EchoHandler)), None)
    if handler is None:
        handler = _EchoHandler()
        handler.setFormatter(logging.Formatter("higgs-patch: %(levelname)s: %(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING)


def _marks() -> dict[str, str]:
    try:
        "✓✗".encode(sys.stdout.encoding or "utf-8")
    except (UnicodeEncodeError, LookupError):
        return ASCII_MARKS
    return MARKS


#: The commands that leave the compatibility shims to others. From transformers 4.48 boson_multimodal imports only
#: with the shims in place first, so the group applies them before every other command starts (smoke, learnability,
#: memory and fingerprint import the upstream; a new command is safe by default) and leaves them, since the process
#: ends with the command. doctor imports the upstream unpatched first on purpose, to show what a user meets; list
#: reads the declarations and imports no torch; run applies the patches in the program it starts.
SHIMS_ELSEWHERE = frozenset({"doctor", "list", "run"})


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="higgs-patch")
@click.option("-v", "--verbose", count=True, help="Log what the patches do (-vv: debug).")
@click.pass_context
def main(ctx: click.Context, verbose: int) -> None:
    """Run-time, versioned, reversible patches that make Higgs Audio v2 train under the Trainer."""
    _configure_logging(verbose)
    if ctx.invoked_subcommand is not None and ctx.invoked_subcommand not in SHIMS_ELSEWHERE:
        _shims_first()


def _shims_first() -> None:
    """Apply the compatibility shims this stack needs, before the command imports boson_multimodal."""
    shims = engine.shims_needed()
    if not shims:
        return
    try:
        engine.apply(*shims)
    except PatchError as exc:
        raise click.ClickException(
            f"boson_multimodal cannot be imported on this stack without {', '.join(shims)}, and they do not apply: "
            f"{exc}\nhiggs-patch doctor says what is wrong and the fix"
        ) from None


@main.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (schema 1).")
def list_patches(as_json: bool) -> None:
    """Every known patch: id, version, default on/off, summary, targets."""
    try:
        declarations = list(engine.known().values())
    except Exception as exc:  # a malformed declaration: named, exit 1, valid JSON with --json
        message = str(exc) if isinstance(exc, PatchError) else f"patches/*.toml: {type(exc).__name__}: {exc}"
        if as_json:
            click.echo(json.dumps({"schema": 1, "patches": [], "error": message}, indent=2))
            sys.exit(1)
        raise click.ClickException(f"cannot read the patch declarations: {message}") from None
    if as_json:
        patches = [
            {"id": d.id, "version": str(d.version), "default": d.default, "summary": d.summary,
             "targets": [t.path for t in d.targets]}
            for d in declarations
        ]
        click.echo(json.dumps({"schema": 1, "patches": patches}, indent=2))
        return
    width = max(len(d.id) for d in declarations)
    for d in declarations:
        click.echo(f"{d.id.ljust(width)}  {str(d.version):<7}  {'on ' if d.default else 'off'}  {d.summary}")
        for target in d.targets:
            click.echo(f"{' ' * (width + 16)}→ {target.path}")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (schema in higgs_patch/doctor.py).")
@click.option("--strict", is_flag=True, help="Warnings count as problems (exit 1).")
def doctor(as_json: bool, strict: bool) -> None:
    """Verify this install without changing it: the stack, known-bad combinations, every patch.

    Each patch: its requirements, the fingerprint of its targets, whether it would apply, whether it
    is applied in this process, and a dry run (apply and revert here, originals back by identity).
    Exit 0 all good, 1 a problem found (with --strict, warnings too).
    """
    from . import doctor as checks

    report = checks.run()
    if as_json:
        click.echo(json.dumps(report.as_json(strict), indent=2))
    else:
        click.echo(checks.render(report, strict, _marks()))
    sys.exit(0 if report.ok(strict) else 1)


@main.command()
@click.option("--steps", default=40, show_default=True, type=click.IntRange(min=2), help="Training steps.")
@click.option(
    "--device", type=click.Choice(["cpu", "cuda", "auto"]), default="auto", show_default=True,
    help="auto: cuda when torch sees a usable GPU, else cpu.",
)
@click.option("--compare", is_flag=True, help="First show each failure of the unpatched upstream the patches fix.")
def smoke(steps: int, device: str, compare: bool) -> None:
    """Train a tiny random Higgs Audio model a few steps with the patches; nothing is downloaded.

    Uses the transformers Trainer and the upstream collator on a synthetic voice-clone dataset made
    in memory. Exits non-zero unless the text and audio losses are finite and (from 10 steps on) falling.
    """
    import transformers

    from . import smoke as job

    transformers.logging.set_verbosity_error()
    marks = _marks()
    try:
        device = job.resolve_device(device)
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(
        f"higgs-patch smoke: a tiny random Higgs Audio model and {job.DATASET_SIZE} synthetic voice-clone samples "
        "(one an audio segment short), made in memory; nothing is downloaded"
    )
    ok = True
    if compare:
        shims = engine.shims_needed()
        click.echo("Without the patches (upstream as installed" + (
            f"; with the {len(shims)} compatibility shims it needs on transformers {transformers.__version__}"
            if shims else "") + "):")
        try:
            ok &= _show_probes(job.unpatched_probe(device), marks, unpatched=True)
        except RuntimeError as exc:
            raise click.ClickException(str(exc)) from None
        click.echo("With the patches:")
        try:
            ok &= _show_probes(job.patched_probe(device), marks, unpatched=False)
        except PatchError as exc:
            _smoke_failed("applying the patches", exc)
        click.echo("")
    click.echo(f"Training the tiny model {steps} steps on {device} with the patches applied:")
    try:
        result = job.train(steps, device)
    except Exception as exc:  # the verdict names it; the traceback is in the log (higgs-patch -v smoke)
        _smoke_failed("training", exc)
    click.echo(_curve(result))
    ok &= result.ok
    for problem in result.problems:
        click.echo(f"  {marks['fail']} {problem}")
    if not result.ok:
        verdict = "FAILED"
    elif job.judges_falling(result.steps):
        verdict = "passed: losses finite and falling"
    else:
        verdict = (f"passed: losses finite; {result.steps} steps are too few to judge whether they are falling "
                   f"({job.FALLING_FROM} or more are)")
    if result.ok and not ok:
        verdict = "FAILED: a patched probe still fails (above)"
    click.echo(f"smoke: {verdict} ({result.steps} steps in {result.seconds:.1f} s on {result.device})")
    sys.exit(0 if ok else 1)


def _smoke_failed(step: str, exc: BaseException) -> None:
    """A one-line verdict; the traceback goes to the log (``higgs-patch -v smoke``)."""
    from .doctor import one_line

    log.info("smoke: %s raised", step, exc_info=exc)
    click.echo(f"smoke: FAILED: {step} raised {one_line(exc, limit=240)}")
    click.echo("  higgs-patch doctor says what is wrong and the fix; higgs-patch -v smoke shows the traceback")
    sys.exit(1)


@main.command()
@click.option("--native", is_flag=True,
              help="transformers' own Higgs Audio v2 (5.3+): it learns to stop with the native patches, and not without.")
def learnability(native: bool) -> None:
    """Show that training under the patches trains the right thing: the model generates its targets back.

    The tiny DualFFN model (delay pattern on), voice-clone samples whose target codes are a function
    of their text, the stock Trainer with the default patches until the loss plateaus; then teacher-
    forced accuracy and greedy generation through the upstream's generate. The same with the seed's
    unshifted audio loss as the contrast. CPU, seeded, about 10 s. Exit 0 when the patched model
    reproduces every target and the unshifted one does not.
    """
    import transformers

    transformers.logging.set_verbosity_error()
    if native:
        _learnability_native()
        return
    from . import learnability as check

    click.echo(
        f"higgs-patch learnability: the tiny DualFFN model (delay pattern on), {check.SAMPLES} voice-clone samples whose\n"
        f"target codes ({check.tiny.CODEBOOKS} codebooks x {check.FRAMES} frames) are a function of their text; trained on cpu "
        "until the loss plateaus, then generated back greedily"
    )
    try:
        comparison = check.compare()
    except PatchError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(check.report(comparison))
    problems = comparison.problems()
    for problem in problems:
        click.echo(f"  {_marks()['fail']} {problem}")
    if problems:
        click.echo("learnability: FAILED")
        sys.exit(1)
    click.echo("learnability: passed: the patched model generates every training target; the unshifted loss does not")


def _learnability_native() -> None:
    from . import learnability_native as check

    click.echo(f"higgs-patch learnability --native: the tiny HiggsAudioV2ForConditionalGeneration memorises {len(check.PROMPTS)} "
               f"prompts' audio ({check.FRAMES} frames), then generates each back greedily (at most {check.MAX_FRAMES} frames)")
    patched, unpatched = check.compare()
    click.echo(check.report(patched, unpatched))
    problems = check.problems(patched, unpatched)
    for problem in problems:
        click.echo(f"  {_marks()['fail']} {problem}")
    if problems:
        click.echo("learnability --native: FAILED")
        sys.exit(1)
    click.echo("learnability --native: passed: with the native patches the model generates its codes and stops; "
               "without them it never stops")


def _show_probes(results: list[Any], marks: dict[str, str], unpatched: bool) -> bool:
    """One line per probe; True unless a probe failed with the patches applied."""
    width = max(len(r.what) for r in results)
    for r in results:
        if r.failure and unpatched:
            line = f"{marks['fail']} {r.what.ljust(width)}  {r.failure}  [fixed by {r.patch}]"
        elif r.failure:
            line = f"{marks['fail']} {r.what.ljust(width)}  still fails: {r.failure}  [{r.patch}]"
        elif unpatched:
            line = f"- {r.what.ljust(width)}  works without {r.patch}"
        else:
            line = f"{marks['ok']} {r.what.ljust(width)}  works  [{r.patch}]"
        click.echo("  " + line)
    return unpatched or not any(r.failure for r in results)


def _curve(result: Any) -> str:
    """The loss curve in brief: five evenly spaced steps, then first → last of each component."""
    history = result.history
    if not history:
        return "  the Trainer logged no loss"
    picks = sorted({round(i * (len(history) - 1) / 4) for i in range(5)})
    lines = [
        f"  {result.parameters:,} parameters, {result.samples} samples, batch size {result.batch_size}",
        f"  {'step':>5}  {'loss':>7}  {'text':>7}  {'audio':>7}  {'grad norm':>9}",
    ]
    for i in picks:
        entry = history[i]
        lines.append(
            f"  {entry.get('step', i + 1):>5}  {_num(entry.get('loss'))}  {_num(entry.get('text_loss'))}  "
            f"{_num(entry.get('audio_loss'))}  {_num(entry.get('grad_norm'), 9)}"
        )
    first, last = history[0], history[-1]
    lines.append(
        "  first → last step: "
        + ", ".join(
            f"{name} {_num(first.get(key), 0)} → {_num(last.get(key), 0)}"
            for name, key in (("text loss", "text_loss"), ("audio loss", "audio_loss"), ("grad norm", "grad_norm"))
        )
    )
    return "\n".join(lines)


def _num(value: Any, width: int = 7) -> str:
    if not isinstance(value, (int, float)):
        return "-".rjust(width)
    return (f"{value:.4f}" if math.isfinite(value) else str(value)).rjust(width)


@main.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option(
    "--patch", "ids", multiple=True, metavar="ID", callback=lambda ctx, param, value: _known_ids(value),
    help="Apply only these patches (repeatable); default: the default ones.",
)
@click.option(
    "--option", "options", multiple=True, metavar="NAME=VALUE", callback=lambda ctx, param, value: _options(value),
    help="A patch option (repeatable), e.g. audio_index_policy=strict; VALUE is read as JSON when it parses.",
)
@click.option("--force", is_flag=True, help="Patch code the gate does not recognise (logged as a warning).")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def run(ids: tuple[str, ...], options: dict[str, Any], force: bool, command: tuple[str, ...]) -> None:
    """Run COMMAND with the patches applied in every Python process it starts.

    For scripts you do not edit, torchrun included: higgs-patch run -- torchrun --nproc_per_node=2 train.py
    """
    from .. import startup

    try:
        startup.exec_with_patches(list(command), ids, options, force)
    except OptionError as exc:
        raise click.BadParameter(str(exc), param_hint="--option") from None
    except PatchError as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"cannot run {command[0]!r}: {exc}") from None


def _known_ids(ids: tuple[str, ...]) -> tuple[str, ...]:
    known = engine.known()
    unknown = [patch_id for patch_id in ids if patch_id not in known]
    if unknown:
        raise click.BadParameter(f"unknown patch id(s) {unknown}; known: {sorted(known)}", param_hint="--patch")
    return ids


def _options(pairs: tuple[str, ...]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep or not name:
            raise click.BadParameter(f"{pair!r} is not NAME=VALUE", param_hint="--option")
        try:
            options[name] = json.loads(text)
        except json.JSONDecodeError:
            options[name] = text
    return options


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON (schema 1) instead of TOML.")
def fingerprint(as_json: bool) -> None:
    """For maintainers: the fingerprint of every patch target in the installed upstream.

    Printed in the form compat/fingerprints.toml stores, so supporting a new upstream release is a
    data change.
    """
    from . import provenance

    try:
        releases = provenance.installed_fingerprints()
    except Exception as exc:
        raise click.ClickException(f"cannot read the installed upstream: {type(exc).__name__}: {exc}") from None
    if as_json:
        click.echo(json.dumps({"schema": 1, "releases": releases}, indent=2))
    else:
        click.echo(provenance.fingerprints_toml(releases), nl=False)


@main.command()
@click.argument("source", type=click.Path(file_okay=False, path_type=str))
@click.argument("target", type=click.Path(file_okay=False, path_type=str))
@click.option("--overwrite", is_flag=True, help="Write into a non-empty TARGET (its old weight files are removed).")
def convert(source: str, target: str, overwrite: bool) -> None:
    """Convert a checkpoint between boson's higgs_audio and transformers' native higgs_audio_v2, both ways.

    Local and strict: the direction from SOURCE's config.json, the config carried over, the released layout
    only (anything else refused, named), every weight mapped or dropped with its reason, the tokenizer files
    copied, the tensors streamed one at a time. Needs transformers >= 5.3; nothing is downloaded.
    """
    from .. import conversion

    try:
        result = conversion.convert(source, target, overwrite=overwrite)
    except (PatchError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(conversion.summary(result))


def _finite(ctx: click.Context, param: click.Parameter, value: float) -> float:
    if not math.isfinite(value):  # FloatRange lets NaN through: no comparison with it is False
        raise click.BadParameter(f"{value} is not a number between 0 and 1")
    return value


@main.command()
@click.option("--seq", default=4096, show_default=True, type=click.IntRange(1, memory_model.MAX_POSITIONS),
              help=f"Expanded positions per sample: text tokens plus audio frames (at most the released model's "
                   f"{memory_model.MAX_POSITIONS:,}).")
@click.option("--batch", default=1, show_default=True, type=click.IntRange(1, memory_model.MAX_BATCH),
              help="Samples per step (per GPU).")
@click.option("--lora", default=16, show_default=True, type=click.IntRange(1, memory_model.MAX_RANK),
              help=f"LoRA rank, on attention, MLP and audio MLP of every layer (at most {memory_model.MAX_RANK:,}: "
                   "full rank of the narrowest, k_proj and v_proj).")
@click.option("--full", is_flag=True, help="A full fine-tune instead of LoRA (then no --lora).")
@click.option("--supervised", default=0.02, show_default=True, type=click.FloatRange(0, 1), callback=_finite,
              help="Fraction of positions that predict a supervised text token (what sparse-text-logits keeps).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (schema 1).")
@click.pass_context
def memory(ctx: click.Context, seq: int, batch: int, lora: int, full: bool, supervised: float, as_json: bool) -> None:
    """What fits where: peak GPU memory of one training step of the released model (28 layers, bf16).

    One row per variant: plain, gradient checkpointing, sparse-text-logits, both. Built from the
    config on the meta device and activation figures measured at the released widths; the
    assumptions are printed below the table.
    """
    if full and ctx.get_parameter_source("lora") is not click.core.ParameterSource.DEFAULT:
        raise click.BadParameter("a full fine-tune has no LoRA rank: give --full or --lora, not both",
                                 param_hint="--lora")
    model = memory_model

    rank = None if full else lora
    estimates = model.estimate(seq, batch, lora=rank, supervised_fraction=supervised)
    figures = model.measured_figures()
    if as_json:
        rows = [{"variant": e.variant, "weights": e.weights, "optimizer": e.states, "activations": e.activations,
                 "total": e.total} for e in estimates]
        click.echo(json.dumps({"schema": 1, "unit": "bytes", "seq": seq, "batch": batch, "lora": rank,
                               "supervised": supervised, "estimates": rows, "figures_measured": figures.measured},
                              indent=2))
        return
    what = "full fine-tune" if full else f"LoRA r {lora}"
    click.echo(f"Released Higgs Audio v2 (28 layers, {model.parameters().total / 1e9:.2f} B parameters, bf16), "
               f"{what}, batch {batch} x {seq:,} positions, {supervised:.0%} supervised text:")
    click.echo(model.render(estimates))
    click.echo(model.ASSUMPTIONS)
    click.echo(f"Activation figures: {figures.measured}")


if __name__ == "__main__":  # python -m higgs_patch.commands.cli: after every command is defined
    main(prog_name="higgs-patch")
