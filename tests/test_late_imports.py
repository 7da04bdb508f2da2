"""Threads and late imports: apply/revert racing an import, patches waiting for an import, reload.

Every scenario runs in a fresh interpreter (imports happen once per process) under a time limit; a
hang is reported as a failure naming the threads still alive, never as a stalled suite. A busy thread
runs beside each race ("under load"), and each race is repeated.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

import needed

# A fresh interpreter applies the shims this line needs first, as users must (none on 4.46): without them
# boson_multimodal does not import there. Each scenario then does what it says to the plugin's other patches.
SHIMS_FIRST = f"""
SHIMS = {needed.shims()!r}
if SHIMS:
    higgs_patch.apply(*SHIMS)
"""

LIMIT_S = 120  # per interpreter; a deadlocked scenario is cut off here and fails


def run_scenario(code: str, *, pythonpath: str | None = None) -> dict:
    environ = {k: v for k, v in os.environ.items() if k != "HIGGS_PATCH_ACTIVATE"}
    environ["OMP_NUM_THREADS"] = "1"
    if pythonpath:
        environ["PYTHONPATH"] = pythonpath
    try:
        result = subprocess.run(
            [sys.executable, "-c", RACE_HELPERS + SHIMS_FIRST + textwrap.dedent(code)],
            capture_output=True, text=True, env=environ, timeout=LIMIT_S,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"scenario did not finish in {LIMIT_S} s (a hang); stderr:\n{(exc.stderr or b'')[-3000:]!r}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


# Shared by the scenarios: threads that record their errors, a busy thread, joins with a timeout.
RACE_HELPERS = textwrap.dedent(
    """
    import json, os, sys, threading, time, traceback
    import higgs_patch

    JOIN_S = 30  # for all the joins of a scenario together
    deadline = []
    errors = []
    stop = threading.Event()

    def guarded(name, body):
        def run():
            try:
                body()
            except BaseException as exc:
                errors.append(f"{name}: {type(exc).__name__}: {exc}")
        return threading.Thread(target=run, name=name, daemon=True)

    def busy():
        while not stop.is_set():
            sum(i * i for i in range(2000))

    def join_all(threads):
        if not deadline:
            deadline.append(time.monotonic() + JOIN_S)
        for thread in threads:
            thread.join(max(0.0, deadline[0] - time.monotonic()))
        return [t.name for t in threads if t.is_alive()]

    def finish(**data):
        stop.set()
        print(json.dumps(data), flush=True)
        os._exit(0)  # threads still alive (a hang) must not keep the interpreter from reporting
    """
)

MODELING = "boson_multimodal.model.higgs_audio.modeling_higgs_audio"


@pytest.mark.parametrize("attempt", range(3))
def test_apply_and_revert_in_a_loop_while_another_thread_imports_never_deadlock(attempt):
    """Issue 12 item 1: the engine lock and a half-imported module's import lock, taken in opposite orders."""
    data = run_scenario(
        f"""
        higgs_patch.apply("forward-kwargs-filter")
        import torch, transformers  # the slow part of the import, so that the race is on the module itself
        cycles = [0]

        def flip():
            while not stop.is_set():
                higgs_patch.apply("sparse-text-logits")
                higgs_patch.revert("sparse-text-logits")
                cycles[0] += 1

        def load():
            import {MODELING}

        threads = [guarded("flip", flip), guarded("load", load), guarded("busy", busy)]
        for thread in threads:
            thread.start()
        hung = join_all(threads[1:2])
        stop.set()
        hung += join_all([threads[0]])
        states = {{}}
        if not hung:
            states = {{s.id: s.state for s in higgs_patch.status()}}
        finish(hung=hung, errors=errors, cycles=cycles[0], states=states)
        """
    )
    assert data["hung"] == [], f"threads still alive after 30 s: {data['hung']}"
    assert data["errors"] == []
    assert data["cycles"] > 0
    assert data["states"]["forward-kwargs-filter"] == "applied"
    assert data["states"]["sparse-text-logits"] == "not-applied"


@pytest.mark.parametrize("attempt", range(3))
def test_apply_while_another_thread_is_halfway_through_the_import_is_no_refusal(attempt):
    """Issue 12 item 2: never fingerprint a half-imported module, never refuse inside another thread's import."""
    data = run_scenario(
        f"""
        higgs_patch.apply()
        import torch, transformers

        def load():
            import {MODELING}

        loader, load_ = guarded("load", load), None
        threads = [loader, guarded("busy", busy)]
        for thread in threads:
            thread.start()
        outcome = "applied"
        while "{MODELING}" not in sys.modules and loader.is_alive():
            time.sleep(0.0002)
        halfway = "{MODELING}" in sys.modules and hasattr(sys.modules["{MODELING}"], "__spec__") and not hasattr(
            sys.modules["{MODELING}"], "HiggsAudioModel")
        try:
            higgs_patch.apply("sparse-text-logits")
        except higgs_patch.PatchError as exc:
            outcome = f"{{type(exc).__name__}}: {{exc}}"
        hung = join_all([loader])
        stop.set()
        states = {{}} if hung else {{s.id: s.state for s in higgs_patch.status()}}
        module = sys.modules.get("{MODELING}")
        forward = type(vars(module.HiggsAudioModel)["forward"]).__name__ if module and not hung else ""
        finish(hung=hung, errors=errors, outcome=outcome, states=states, halfway=halfway, forward=forward)
        """
    )
    assert data["hung"] == []
    assert data["halfway"], "the race was not exercised: apply() did not see the module half-imported"
    assert data["errors"] == [], "the loader thread's import failed"
    assert data["outcome"] == "applied"
    assert data["states"]["sparse-text-logits"] == "applied"
    assert data["states"]["forward-kwargs-filter"] == "applied"
    assert data["forward"] == "Proxy"  # the slot's proxy, a wrapt FunctionWrapper


def test_apply_from_inside_the_import_of_its_own_target_in_the_same_thread_says_so():
    """A user's post-import hook on audio_head runs while modeling_higgs_audio is half-imported in this thread."""
    data = run_scenario(
        f"""
        import wrapt
        outcome = []

        def on_audio_head(module):
            try:
                higgs_patch.apply("sparse-text-logits")
                outcome.append("returned")
            except higgs_patch.PatchError as exc:
                outcome.append(str(exc))

        wrapt.register_post_import_hook(on_audio_head, "boson_multimodal.model.higgs_audio.audio_head")
        import {MODELING}
        finish(outcome=outcome, state={{s.id: s.state for s in higgs_patch.status()}}["sparse-text-logits"])
        """
    )
    assert len(data["outcome"]) == 1
    assert f"{MODELING} is being imported by this very thread" in data["outcome"][0]
    assert data["state"] == "not-applied"


# --- patches waiting for an import (issue 12 item 5) -----------------------------------------------------


COLLATOR = "boson_multimodal.data_collator.higgs_audio_collator"


def test_apply_before_the_import_decides_then_an_edited_upstream_is_refused_by_apply_itself(edited_upstream):
    data = run_scenario(
        """
        outcome = "returned"
        shims_published = os.environ.get("HIGGS_PATCH_ACTIVATE")
        try:
            higgs_patch.apply()
        except higgs_patch.IncompatibleUpstreamError as exc:
            outcome = str(exc)
        imported = sorted(m for m in ("torch", "transformers", "boson_multimodal") if m in sys.modules)
        states = {s.id: s.state for s in higgs_patch.status() if s.id not in SHIMS}
        published = os.environ.get("HIGGS_PATCH_ACTIVATE") != shims_published
        finish(outcome=outcome, imported=imported, states=states, published=published)
        """,
        pythonpath=str(edited_upstream),
    )
    assert "collator-audio-index" in data["outcome"] and "HiggsAudioSampleCollator.__call__" in data["outcome"]
    assert data["imported"] == []  # decided from the source files, nothing imported
    assert "applied" not in data["states"].values() and "pending" not in data["states"].values()
    assert data["states"]["collator-audio-index"] == "incompatible"
    assert data["published"] is False  # nothing beyond the shims applied first reaches the children either


def test_forcing_an_edited_upstream_before_the_import_warns_at_apply_once(edited_upstream):
    data = run_scenario(
        f"""
        import logging
        seen = []
        handler = logging.Handler()
        handler.emit = lambda record: seen.append(record.getMessage())
        logging.getLogger("higgs_patch").addHandler(handler)
        higgs_patch.apply("collator-audio-index", force=True)
        at_apply = [m for m in seen if "forced" in m]
        import {COLLATOR} as c
        finish(at_apply=at_apply, total=[m for m in seen if "forced" in m],
               state={{s.id: [s.state, s.reason] for s in higgs_patch.status()}}["collator-audio-index"],
               call=type(vars(c.HiggsAudioSampleCollator)["__call__"]).__name__)
        """,
        pythonpath=str(edited_upstream),
    )
    assert len(data["at_apply"]) == 1 and "collator-audio-index" in data["at_apply"][0]
    assert data["total"] == data["at_apply"]  # the import checks again and finds what apply() forced
    assert data["state"] == ["applied", "forced over unrecognised upstream"]
    assert data["call"] == "Proxy"  # the slot's proxy, a wrapt FunctionWrapper


def test_a_target_whose_source_cannot_be_found_before_the_import_is_decided_at_the_import():
    """At interpreter start a later .pth may still have to add the upstream's path: not found is no refusal."""
    data = run_scenario(
        f"""
        from higgs_patch import fingerprint
        real = fingerprint.source_file

        def not_on_the_path_yet(module):
            if isinstance(module, str):
                raise FileNotFoundError(f"no source file for module {{module!r}}")
            return real(module)

        fingerprint.source_file = not_on_the_path_yet
        higgs_patch.apply("collator-audio-index")
        before = {{s.id: s.state for s in higgs_patch.status()}}["collator-audio-index"]
        import {COLLATOR}
        finish(before=before, after={{s.id: s.state for s in higgs_patch.status()}}["collator-audio-index"])
        """
    )
    assert data == {"before": "pending", "after": "applied"}


def test_code_that_changed_between_apply_and_import_is_refused_in_every_import_until_reverted(edited_upstream):
    data = run_scenario(
        f"""
        higgs_patch.apply("collator-audio-index", "trainer-compute-loss")
        sys.path.insert(0, {str(edited_upstream)!r})  # the import now finds other code than apply() checked
        outcomes = []
        for _ in range(2):
            try:
                import {COLLATOR}
                outcomes.append("imported")
            except higgs_patch.IncompatibleUpstreamError as exc:
                outcomes.append(str(exc))
        states = {{s.id: s.state for s in higgs_patch.status()}}
        told = sorted(set(json.loads(os.environ["HIGGS_PATCH_ACTIVATE"])["patches"]) - set(SHIMS))
        higgs_patch.revert("collator-audio-index")
        told_after = sorted(set(json.loads(os.environ["HIGGS_PATCH_ACTIVATE"])["patches"]) - set(SHIMS))
        import {COLLATOR} as c
        after = type(vars(c.HiggsAudioSampleCollator)["__call__"]).__name__
        finish(outcomes=outcomes, states=states, after=after, file=c.__file__, told=told, told_after=told_after)
        """
    )
    first, second = data["outcomes"]
    assert "collator-audio-index" in first and "HiggsAudioSampleCollator.__call__" in first
    assert second == first  # a second import does not run the unpatched collator silently
    assert data["states"]["collator-audio-index"] == "incompatible"
    assert data["states"]["trainer-compute-loss"] == "pending"  # the rest of that call still waits, untouched
    assert data["told"] == ["collator-audio-index", "trainer-compute-loss"]  # children refuse that code too
    assert data["told_after"] == ["trainer-compute-loss"]
    assert data["after"] == "function"  # reverted on purpose: the import goes through, unpatched
    assert data["file"].startswith(str(edited_upstream))


def test_a_bad_option_is_refused_by_apply_before_anything_waits_or_is_published():
    data = run_scenario(
        """
        outcome = "returned"
        shims_published = os.environ.get("HIGGS_PATCH_ACTIVATE")
        try:
            higgs_patch.apply(audio_index_policy="Strict")
        except higgs_patch.PatchError as exc:
            outcome = f"{type(exc).__name__}: {exc}"
        finish(outcome=outcome, states={s.id: s.state for s in higgs_patch.status() if s.id not in SHIMS},
               published=os.environ.get("HIGGS_PATCH_ACTIVATE") != shims_published)
        """
    )
    assert "audio_index_policy" in data["outcome"] and "'strict'" in data["outcome"]
    assert set(data["states"].values()) == {"not-applied"}
    assert data["published"] is False  # nothing beyond the shims applied first


# --- importlib.reload (issue 12 item 7) ---------------------------------------------------------------------


def test_reloading_a_patched_module_is_reported_and_apply_patches_the_new_code():
    data = run_scenario(
        f"""
        import importlib
        import {MODELING} as m
        higgs_patch.apply("forward-kwargs-filter", "sparse-text-logits")
        old = m.HiggsAudioModel
        importlib.reload(m)
        new = m.HiggsAudioModel
        after_reload = {{s.id: [s.state, s.reason] for s in higgs_patch.status()}}
        new_forward = type(vars(new)["forward"]).__name__
        old_forward = type(vars(old)["forward"]).__name__
        higgs_patch.apply("forward-kwargs-filter", "sparse-text-logits")
        reapplied = {{s.id: s.state for s in higgs_patch.status()}}
        patched = type(vars(new)["forward"]).__name__
        higgs_patch.revert()
        reverted = type(vars(new)["forward"]).__name__
        finish(after_reload=after_reload, new_forward=new_forward, old_forward=old_forward, reapplied=reapplied,
               patched=patched, reverted=reverted, fresh=new is not old)
        """
    )
    assert data["fresh"]
    assert data["new_forward"] == "function"
    for patch_id in ("forward-kwargs-filter", "sparse-text-logits"):
        state, reason = data["after_reload"][patch_id]
        assert state == "not-applied", "status() says applied while the reloaded class is unpatched"
        assert "reload" in reason and MODELING in reason
        assert data["reapplied"][patch_id] == "applied"
    assert data["old_forward"] == "function"  # the old class got its original back, nothing half-patched
    assert data["patched"] == "Proxy"  # the slot's proxy, a wrapt FunctionWrapper
    assert data["reverted"] == "function"
