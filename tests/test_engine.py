"""The engine on the real upstream: apply, revert, status, stacking, atomicity, the gate."""

from __future__ import annotations

import importlib

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import wrapt
from packaging.specifiers import SpecifierSet

import higgs_patch
import needed
from higgs_patch import declarations, engine, fingerprint
from higgs_patch.slots import Slot

import boson_multimodal.data_collator.higgs_audio_collator as collator_module
import boson_multimodal.model.higgs_audio.modeling_higgs_audio as modeling
import transformers.trainer

Collator = collator_module.HiggsAudioSampleCollator
Model = modeling.HiggsAudioModel
FORWARD = "boson_multimodal.model.higgs_audio.modeling_higgs_audio:HiggsAudioModel.forward"
CALL = "boson_multimodal.data_collator.higgs_audio_collator:HiggsAudioSampleCollator.__call__"


def current(default_only: bool = False) -> dict[str, object]:
    """The object at every patch target this stack needs now: raw class attributes, as the slots see them
    (an added name: absent, None)."""
    return {
        target.path: _object_at(target)
        for declaration in needed.declarations(default_only) for target in declaration.targets
    }


def _object_at(target) -> object:
    holder, _, name = target.qualname.rpartition(".") if target.adds else ("", "", "")
    if target.adds:
        parent = wrapt.resolve_path(sys.modules[target.module], holder)[2] if holder else sys.modules[target.module]
        return vars(parent).get(name)
    # transformers' own Higgs Audio v2 (the native patches' targets) is imported here, as boson's is above
    return wrapt.resolve_path(importlib.import_module(target.module), target.qualname)[2]


SHIMS = needed.shims()  # conftest keeps them applied through every test (none on 4.46)
higgs_patch.revert()
ORIGINALS = current()  # nothing of the plugin applied
if SHIMS:
    higgs_patch.apply(*SHIMS)


def originals_back() -> bool:
    """Every target holds its original object, but a target of a shim this line needs while that shim stays
    applied (as conftest keeps it): that holds the shim's slot over the original, with the kept shims' layers only."""
    kept = {s.id for s in higgs_patch.status() if s.id in SHIMS and s.state in ("applied", "pending")}
    layers: dict[str, int] = {}
    for declaration in needed.declarations():
        for target in declaration.targets:
            layers.setdefault(target.path, 0)
            layers[target.path] += declaration.id in kept
    now = current()

    def back(path: str) -> bool:
        if not layers[path]:
            return now[path] is ORIGINALS[path]
        slot = engine._slots.get(path)
        return (slot is not None and now[path] is slot.installed and slot.original is ORIGINALS[path]
                and len(slot.layers) == layers[path])

    return all(back(path) for path in ORIGINALS)


def states() -> dict[str, str]:
    return {s.id: s.state for s in higgs_patch.status()}


def run_python(code: str, *, pythonpath: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    environ = {**os.environ, **(env or {})}
    if pythonpath:
        environ["PYTHONPATH"] = pythonpath
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=environ, timeout=300
    )


# --- apply / revert / status ------------------------------------------------------------------------


def test_every_default_patch_applied_before_any_import_is_accepted_and_installs_at_the_imports():
    """Decided from source before the import: inherited targets (a method defined in transformers) included."""
    # every module a patch needed here targets: boson's, the Trainer's, transformers' own Higgs Audio v2 (5.x)
    modules = sorted({target.module for declaration in needed.declarations(True) for target in declaration.targets})
    result = run_python(
        f"""
        import importlib, json, higgs_patch
        before = {{s.id: s.state for s in higgs_patch.apply()}}
        import boson_multimodal.model.higgs_audio.modeling_higgs_audio
        import boson_multimodal.data_collator.higgs_audio_collator
        import transformers.trainer
        for module in {modules!r}:
            importlib.import_module(module)
        after = {{s.id: s.state for s in higgs_patch.status() if s.default}}
        print(json.dumps({{"before": before, "after": after}}))
        """
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout.strip().splitlines()[-1])
    off = needed.not_needed()
    assert {pid for pid, state in data["before"].items() if state == "not-needed"} == off & data["before"].keys()
    assert {state for pid, state in data["before"].items() if pid not in off} == {"pending"}
    assert {state for pid, state in data["after"].items() if pid not in off} == {"applied"}
    assert data["after"].keys() == data["before"].keys()


def test_apply_wraps_every_default_target_and_revert_restores_the_originals_by_identity():
    report = higgs_patch.apply()
    assert {s.id for s in report} == {s.id for s in higgs_patch.status() if s.default}
    assert all(s.state == ("not-needed" if s.id in needed.not_needed() else "applied") for s in report)
    assert all(now is not ORIGINALS[path] for path, now in current(default_only=True).items())
    assert Model.__dict__["forward"].__wrapped__ is ORIGINALS[FORWARD]

    reverted = higgs_patch.revert()
    assert all(s.state == "not-applied" for s in reverted)
    assert originals_back()


def test_a_subset_applies_only_the_named_patch():
    higgs_patch.apply("forward-kwargs-filter")
    assert states()["forward-kwargs-filter"] == "applied"
    assert {s.id for s in needed.beyond_shims() if s.state != "not-applied"} == {"forward-kwargs-filter"}
    assert Collator.__dict__["__call__"] is ORIGINALS[CALL]
    higgs_patch.revert("forward-kwargs-filter")
    assert originals_back()


def test_applied_context_reverts_what_it_applied_and_keeps_what_was_there_before():
    higgs_patch.apply("forward-kwargs-filter")
    with higgs_patch.applied("forward-kwargs-filter", "device-tensor-factory") as report:
        assert {s.id: s.state for s in report} == {"forward-kwargs-filter": "applied", "device-tensor-factory": "applied"}
    assert states()["device-tensor-factory"] == "not-applied"
    assert states()["forward-kwargs-filter"] == "applied"


def test_reverting_what_is_not_applied_is_a_no_op():
    not_applied = [s.id for s in needed.beyond_shims()]  # all of them but the shims conftest keeps applied
    assert all(s.state == "not-applied" for s in higgs_patch.revert(*not_applied))
    assert originals_back()


def test_apply_twice_installs_one_layer():
    higgs_patch.apply()
    higgs_patch.apply()
    wrapper = Model.__dict__["forward"]
    assert wrapper.__wrapped__ is ORIGINALS[FORWARD]
    assert len(engine._slots[FORWARD].layers) == 2  # forward-kwargs-filter and model-loss
    assert len(engine._slots[CALL].layers) == 2  # two different patches on the collator's __call__


def test_eight_threads_applying_at_once_install_one_layer():
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def worker():
        try:
            barrier.wait()
            higgs_patch.apply()
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert Model.__dict__["forward"].__wrapped__ is ORIGINALS[FORWARD]
    assert len(engine._slots[FORWARD].layers) == 2  # forward-kwargs-filter and model-loss
    assert len(engine._slots[CALL].layers) == 2


def test_unknown_patch_and_unknown_option_are_errors_naming_what_is_known():
    with pytest.raises(higgs_patch.PatchError, match="forward-kwargs-filter"):
        higgs_patch.apply("no-such-patch")
    with pytest.raises(higgs_patch.PatchError, match="audio_index_policy"):
        higgs_patch.apply(audio_index_polcy="strict")
    assert originals_back()


def test_options_reach_the_patch_that_declares_them_and_a_second_apply_with_others_is_refused():
    higgs_patch.apply("collator-audio-index", audio_index_policy="strict")
    assert {s.id: s.options for s in higgs_patch.status()}["collator-audio-index"] == {"audio_index_policy": "strict"}
    with pytest.raises(higgs_patch.PatchError, match="revert it before"):
        higgs_patch.apply("collator-audio-index", audio_index_policy="clamp")


def test_one_info_line_per_applied_and_per_reverted_patch(patch_log):
    higgs_patch.apply("forward-kwargs-filter", "device-tensor-factory")
    higgs_patch.revert()
    messages = [r.getMessage() for r in patch_log.records if r.name == "higgs_patch"]
    assert sum("applied to" in m for m in messages) == 2
    assert sum(m.endswith("reverted") for m in messages) == 2 + len(SHIMS)  # a bare revert() takes the shims too


# --- stacking ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("first_out", ["collator-audio-index", "device-tensor-factory"])
def test_two_patches_on_one_target_revert_in_any_order(first_out):
    import tiny

    higgs_patch.apply("collator-audio-index", "device-tensor-factory")
    other = ({"collator-audio-index", "device-tensor-factory"} - {first_out}).pop()
    higgs_patch.revert(first_out)
    assert states()[other] == "applied"
    short = tiny.sample(reference=None)
    collate = tiny.collator(return_audio_in_tokens=False)
    if other == "collator-audio-index":
        assert collate([short]).audio_out_ids.shape[1] > 0  # still routed: no IndexError
    else:
        with pytest.raises(IndexError):
            collate([short])
        assert collate([tiny.sample(device="meta")]).audio_out_ids.device.type == "meta"
    higgs_patch.revert(other)
    assert originals_back()


def test_revert_leaves_a_later_foreign_wrapper_in_place_and_says_so(patch_log):
    higgs_patch.apply("forward-kwargs-filter")
    ours = Model.__dict__["forward"]
    wrapt.wrap_function_wrapper(Model, "forward", lambda wrapped, instance, args, kwargs: wrapped(*args, **kwargs))
    theirs = Model.__dict__["forward"]
    try:
        higgs_patch.revert("forward-kwargs-filter")
        assert Model.__dict__["forward"] is theirs
        assert theirs.__wrapped__ is ours
        assert any("someone else" in r.getMessage() for r in patch_log.records)
        import tiny

        model = tiny.model()
        with pytest.raises(TypeError, match="labels"):  # ours passes straight through now
            model(input_ids=tiny.collator()([tiny.sample()]).input_ids, labels=None)
    finally:
        Model.forward = ORIGINALS[FORWARD]
        engine._slots.pop(FORWARD, None)


def test_a_class_level_replacement_after_apply_is_not_taken_for_a_reload(patch_log):
    """Community trainers assign HiggsAudioModel.forward after import; only a reload makes new, unpatched code."""
    higgs_patch.apply("forward-kwargs-filter")
    ours = Model.__dict__["forward"]

    def theirs(self, *args, **kwargs):
        return ours(self, *args, **kwargs)

    Model.forward = theirs
    try:
        assert states()["forward-kwargs-filter"] == "bypassed"  # reported as replaced, not as reloaded
        assert not any("module-reloaded" in r.getMessage() for r in patch_log.records)
        higgs_patch.revert("forward-kwargs-filter")
        assert Model.__dict__["forward"] is theirs
        assert any("replaced after higgs_patch" in r.getMessage() for r in patch_log.records)
    finally:
        Model.forward = ORIGINALS[FORWARD]
        engine._slots.pop(FORWARD, None)


def test_a_bound_patched_method_gives_the_patched_function_as_its___func__():
    """accelerate's mixed precision rebinds ``model.forward.__func__`` on the instance: it must run the layers."""
    import inspect
    from types import MethodType

    import torch

    import tiny

    higgs_patch.apply("forward-kwargs-filter", "model-loss")
    model = tiny.model()
    batch = tiny.DictCollator(tiny.collator())(tiny.samples(2))
    del batch["label_ids"]  # only the filter turns labels into label_ids
    function = model.forward.__func__
    assert model.forward.__self__ is model and function.__wrapped__ is ORIGINALS[FORWARD]
    assert inspect.signature(MethodType(function, model)) == inspect.signature(MethodType(ORIGINALS[FORWARD], model))
    expected = model(**batch).loss
    bound_without_owner = Model.__dict__["forward"].__get__(model)  # descriptor protocol, owner left out
    for call in (lambda: function(model, **batch), lambda: MethodType(function, model)(**batch),
                 lambda: MethodType(torch.autocast("cpu", enabled=False)(function), model)(**batch),
                 lambda: bound_without_owner.__func__(model, **batch)):
        assert torch.equal(call().loss, expected)
    assert Collator.__dict__["__call__"] is ORIGINALS[CALL]  # untouched by that patch
    higgs_patch.revert()
    assert originals_back()


def test_revert_after_accelerate_rebound_the_forward_restores_the_originals_by_identity():
    """The instance keeps what accelerate put there; with our layers gone, it passes calls straight to upstream."""
    from types import MethodType

    import torch

    import tiny

    higgs_patch.apply()
    model = tiny.model()
    model.forward = MethodType(torch.autocast("cpu", dtype=torch.bfloat16)(model.forward.__func__), model)
    batch = tiny.DictCollator(tiny.collator())(tiny.samples(2))
    assert model(**batch).loss is not None
    higgs_patch.revert()
    assert originals_back()
    with pytest.raises(TypeError, match="unexpected keyword argument 'labels'"):
        model(**batch)
    del batch["labels"]
    assert model(**batch).loss is None  # upstream's forward, through the inert proxy


def test_an_instance_attribute_hiding_a_patched_method_is_a_bypass_only_for_watched_models():
    import tiny

    higgs_patch.apply("forward-kwargs-filter")
    seen, unseen = tiny.model(), tiny.model()
    for model in (seen, unseen):
        model.forward = lambda **kwargs: None
    engine.watch(seen)
    report = {s.id: s for s in higgs_patch.status()}["forward-kwargs-filter"]
    assert report.state == "bypassed" and "replaced on the HiggsAudioModel instance" in report.reason
    del seen.forward
    assert states()["forward-kwargs-filter"] == "applied"
    higgs_patch.revert()
    assert originals_back() and not list(engine._watched)


# --- atomicity -------------------------------------------------------------------------------------------


def test_a_patch_failing_mid_apply_leaves_no_patch_of_that_call_applied(monkeypatch):
    # Patches apply in the order named: the first two go in, then the last one's factory raises.
    from higgs_patch.fixes import trainer_compute_loss

    def broken(original, options):
        raise RuntimeError("factory broke")

    monkeypatch.setattr(trainer_compute_loss, "compute_higgs_loss", broken)
    with pytest.raises(higgs_patch.PatchError, match="trainer-compute-loss.*factory broke"):
        higgs_patch.apply("forward-kwargs-filter", "device-tensor-factory", "trainer-compute-loss")
    assert all(s.state != "applied" for s in needed.beyond_shims())
    assert originals_back()


# --- declarations ----------------------------------------------------------------------------------------


def declaration_text(wrapper: str) -> str:
    return textwrap.dedent(
        f"""
        id = "x"
        version = "1.0.0"
        summary = "s"
        symptom = "s"
        [[targets]]
        path = "boson_multimodal.model.higgs_audio.modeling_higgs_audio:HiggsAudioModel.forward"
        wrapper = "{wrapper}"
        """
    )


@pytest.mark.parametrize("wrapper", ["os:system", "higgs_patchx.evil:wrap", "tests.helpers:wrap", "higgs_patch"])
def test_a_declaration_whose_implementation_lies_outside_higgs_patch_is_refused(wrapper):
    with pytest.raises(higgs_patch.DeclarationError, match="inside the 'higgs_patch' package"):
        declarations.load(declaration_text(wrapper))


def test_a_declaration_inside_higgs_patch_is_accepted():
    declaration = declarations.load(declaration_text("higgs_patch.fixes.forward_kwargs_filter:filter_kwargs"))
    assert declaration.modules == ("boson_multimodal.model.higgs_audio.modeling_higgs_audio",)


def test_every_shipped_declaration_resolves_to_a_factory_and_a_known_target():
    for declaration in engine.known().values():
        for target in declaration.targets:
            module_name, _, name = target.wrapper.partition(":")
            assert callable(getattr(__import__(module_name, fromlist=[name]), name))
    higgs_patch.revert()  # the shims too: a name a shim adds is absent upstream (conftest applies them again)
    for declaration in needed.declarations():
        for target in declaration.targets:
            __import__(target.module)
            slot = Slot(target.path, sys.modules[target.module], target.qualname, adds=target.adds)  # an added name: absent
            assert slot.original is not None or target.adds


# --- fingerprints ------------------------------------------------------------------------------------------


def installed_source(module) -> bytes:
    return Path(module.__file__).read_bytes()


DOCSTRINGS = {
    modeling: (b'"""Forward pass for the Higgs-Audio model.', b'"""Runs the model (docstring reworded).'),
    collator_module: (b'"""Collate the input data with support for long audio processing."""', b'"""Collates."""'),
}


@pytest.mark.parametrize(
    "module,qualname",
    [(modeling, "HiggsAudioModel.forward"), (collator_module, "HiggsAudioSampleCollator.__call__"), (collator_module, None)],
)
def test_fingerprint_ignores_line_endings_formatting_and_docstrings_but_not_code(module, qualname):
    crlf = installed_source(module)
    assert b"\r\n" in crlf  # the registry wheel really is CRLF
    lf = crlf.replace(b"\r\n", b"\n")
    found = fingerprint.of_source(crlf, qualname)
    assert fingerprint.of_source(lf, qualname) == found
    old_doc, new_doc = DOCSTRINGS[module]
    assert old_doc in lf
    reformatted = lf.replace(b"(\n", b"(  # a comment\n").replace(old_doc, new_doc).replace(b"\n\n", b"\n\n\n")
    assert fingerprint.of_source(reformatted, qualname) == found
    edited = lf.replace(b"-100", b"-101", 1) if module is collator_module else lf.replace(b"round_to = 1 if", b"round_to = 2 if")
    assert edited != lf
    assert fingerprint.of_source(edited, qualname) != found


def test_the_installed_upstream_matches_the_known_fingerprints():
    from higgs_patch import gate

    for declaration in engine.known().values():
        if gate.off_line(declaration):  # transformers' own Higgs Audio v2 before 5.3: nothing of it to check
            continue
        for check in gate.code_checks(declaration):
            assert check.matches, str(check)
            boson = check.target.startswith("boson_multimodal")
            upstreams = ("boson-multimodal 0.1.1",) if boson else ("transformers ",)
            if _inherited(check.target):  # a method boson's class takes from transformers: its code is that line's
                upstreams += ("transformers ",)
            assert any(release.startswith(upstreams) for release in check.releases), str(check)


def _inherited(path: str) -> bool:
    module, _, qualname = path.partition(":")
    holder, _, name = qualname.rpartition(".")
    parent = wrapt.resolve_path(importlib.import_module(module), holder)[2] if holder else None
    return isinstance(parent, type) and name not in vars(parent)


# --- import order and the gate, in fresh interpreters ---------------------------------------------------


def test_apply_before_import_is_pending_imports_nothing_and_patches_on_import():
    modules = sorted({target.module for declaration in needed.declarations(True) for target in declaration.targets})
    result = run_python(
        f"""
        import importlib, sys, json, higgs_patch
        higgs_patch.apply()
        before = {{s.id: s.state for s in higgs_patch.status() if s.default}}
        imported = [m for m in ("torch", "transformers", "boson_multimodal") if m in sys.modules]
        import boson_multimodal.model.higgs_audio.modeling_higgs_audio as m
        from boson_multimodal.data_collator.higgs_audio_collator import HiggsAudioSampleCollator as C
        import transformers.trainer
        for module in {modules!r}:  # transformers' own Higgs Audio v2 too, where it exists (5.x)
            importlib.import_module(module)
        after = {{s.id: s.state for s in higgs_patch.status() if s.default}}
        wrapped = [f"{{c.__module__}}.{{c.__name__}}" for c in type(m.HiggsAudioModel.__dict__["forward"]).__mro__]
        print(json.dumps({{"before": before, "imported": imported, "after": after, "wrapped": wrapped}}))
        """
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout.strip().splitlines()[-1])
    off = needed.not_needed()
    assert {state for pid, state in data["before"].items() if pid not in off} == {"pending"}
    assert {data["before"][pid] for pid in off & data["before"].keys()} <= {"not-needed"}
    assert data["imported"] == []
    assert {state for pid, state in data["after"].items() if pid not in off} == {"applied"}
    assert data["wrapped"][0] == "higgs_patch.slots.Proxy"  # the slot's proxy: wrapt's FunctionWrapper, whose
    assert data["wrapped"][1].endswith(".FunctionWrapper")  # bound form keeps the layers under __func__


def test_a_hook_that_fires_after_revert_does_nothing():
    result = run_python(
        """
        import higgs_patch
        higgs_patch.apply("forward-kwargs-filter")
        higgs_patch.revert("forward-kwargs-filter")  # the shims this line needs (none on 4.46) stay: boson imports
        import boson_multimodal.model.higgs_audio.modeling_higgs_audio as m
        state = {s.id: s.state for s in higgs_patch.status()}["forward-kwargs-filter"]
        print(type(m.HiggsAudioModel.__dict__["forward"]).__name__, state)
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-2:] == ["function", "not-applied"]


SHOW_GATE = """
    import json, logging, higgs_patch
    import boson_multimodal.data_collator.higgs_audio_collator as c
    outcome = "applied"
    try:
        higgs_patch.apply(force={force})
    except higgs_patch.IncompatibleUpstreamError as exc:
        outcome = str(exc)
    print(json.dumps({{"file": c.__file__, "outcome": outcome,
                      "states": {{s.id: s.state for s in higgs_patch.status()}},
                      "call": type(vars(c.HiggsAudioSampleCollator)["__call__"]).__name__}}))
"""


def test_edited_upstream_is_refused_with_a_helpful_error_and_nothing_is_patched(edited_upstream):
    result = run_python(SHOW_GATE.format(force=False), pythonpath=str(edited_upstream))
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout.strip().splitlines()[-1])
    assert data["file"].startswith(str(edited_upstream))
    message = data["outcome"]
    for expected in ("collator-audio-index", "HiggsAudioSampleCollator.__call__", data["file"], "unknown",
                     "boson-multimodal 0.1.1", "force=True", "HIGGS_PATCH_FORCE"):
        assert expected in message
    assert data["call"] == "function"
    # the shims this line needs came with the environment conftest published (start-up hook): kept, as asked
    assert "applied" not in [state for pid, state in data["states"].items() if pid not in SHIMS]
    assert data["states"]["collator-audio-index"] == "incompatible"


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_force_patches_the_edited_upstream_with_a_warning(edited_upstream, how):
    env = {"HIGGS_PATCH_FORCE": "1"} if how == "environment" else {}
    result = run_python(SHOW_GATE.format(force=how == "argument"), pythonpath=str(edited_upstream), env=env)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout.strip().splitlines()[-1])
    assert data["outcome"] == "applied"
    assert data["call"] == "Proxy"  # the slot's proxy, a wrapt FunctionWrapper
    assert data["states"]["collator-audio-index"] == data["states"]["device-tensor-factory"] == "applied"
    assert data["states"]["trainer-compute-loss"] == "pending"  # transformers.trainer is not imported there
    assert "forced" in result.stderr


def test_a_stack_conflict_names_what_was_requested_and_what_was_found(monkeypatch):
    from higgs_patch import gate

    declaration = engine.known()["trainer-compute-loss"]
    broken = dataclasses.replace(
        declaration, requires={"transformers": SpecifierSet(">=9"), "no-such-dist": SpecifierSet(">=1")}
    )
    found = [str(c) for c in gate.conflicts(broken)]
    assert f'requested: "transformers >=9" but found: "transformers {transformers.__version__}"' in found
    assert 'requested: "no-such-dist >=1" but found: nothing (not installed)' in found
    monkeypatch.setitem(engine.known(), "trainer-compute-loss", broken)
    with pytest.raises(higgs_patch.IncompatibleUpstreamError, match="no-such-dist"):
        higgs_patch.apply("trainer-compute-loss")
    assert states()["trainer-compute-loss"] == "incompatible"
    assert originals_back()


def test_a_module_target_wraps_only_the_functions_its_declaration_names():
    text = declaration_text("higgs_patch.fixes.device_tensor_factory:place_on_device").replace(
        "modeling_higgs_audio:HiggsAudioModel.forward", "modeling_higgs_audio:torch"
    )
    assert declarations.load(text + 'names = ["full"]\n').targets[0].names == ("full",)
    with pytest.raises(higgs_patch.DeclarationError, match="identifiers"):
        declarations.load(text + 'names = ["full()"]\n')
    slot = Slot("m:torch", modeling, "torch")
    with pytest.raises(ValueError, match="needs the names"):
        slot.add(lambda wrapped, instance, args, kwargs: wrapped(*args, **kwargs))
    assert modeling.torch is sys.modules["torch"] and slot.layers == () and slot.installed is None


def test_a_patch_over_several_modules_is_pending_on_all_of_them_then_applied():
    result = run_python(
        """
        import json, higgs_patch
        state = lambda: [(s.state, s.reason) for s in higgs_patch.status() if s.id == "sparse-text-logits"][0]
        higgs_patch.apply("sparse-text-logits")
        before = state()
        import boson_multimodal.model.higgs_audio.modeling_higgs_audio  # imports audio_head on its way
        print(json.dumps([before, state()]))
        """
    )
    assert result.returncode == 0, result.stderr
    (before, reason), (after, _) = json.loads(result.stdout.strip().splitlines()[-1])
    assert before == "pending" and "audio_head" in reason and "modeling_higgs_audio" in reason
    assert after == "applied"


def test_a_refusal_before_the_import_leaves_nothing_of_the_call_and_the_others_apply_by_id(tmp_path):
    """Only the collator module's helper changes: device-tensor-factory (whole module) is refused by
    apply() itself, before the import; collator-audio-index of the same call is not left pending,
    and applied alone it is installed at the import."""
    root = tmp_path / "upstream"
    shutil.copytree(Path(collator_module.__file__).parents[1], root / "boson_multimodal")
    target = root / "boson_multimodal" / "data_collator" / "higgs_audio_collator.py"
    source = target.read_bytes()
    target.write_bytes(source.replace(b"return (n + round_to - 1) // round_to * round_to", b"return -(-n // round_to) * round_to"))
    assert target.read_bytes() != source
    result = run_python(
        """
        import json, higgs_patch
        try:
            higgs_patch.apply("collator-audio-index", "device-tensor-factory")
            outcome = "returned"
        except higgs_patch.IncompatibleUpstreamError as exc:
            outcome = str(exc)
        after_call = {s.id: s.state for s in higgs_patch.status()}
        higgs_patch.apply("collator-audio-index")
        import boson_multimodal.data_collator.higgs_audio_collator
        print(json.dumps({"outcome": outcome, "after_call": after_call, "states": {s.id: s.state for s in higgs_patch.status()}}))
        """,
        pythonpath=str(root),
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout.strip().splitlines()[-1])
    assert "device-tensor-factory" in data["outcome"] and "higgs_audio_collator:torch" in data["outcome"]
    assert data["after_call"]["collator-audio-index"] == "not-applied"
    assert data["after_call"]["device-tensor-factory"] == "incompatible"
    assert data["states"]["collator-audio-index"] == "applied"


def test_a_patch_that_fails_while_installing_on_import_is_named_and_refuses_every_import_until_reverted():
    result = run_python(
        """
        import json, higgs_patch
        from higgs_patch.fixes import trainer_compute_loss

        def broken(original, options):
            raise ValueError("factory broke")

        trainer_compute_loss.compute_higgs_loss = broken
        higgs_patch.apply("trainer-compute-loss")
        outcomes = []
        for _ in range(2):
            try:
                import transformers.trainer
                outcomes.append("imported")
            except higgs_patch.PatchError as exc:
                outcomes.append(f"{type(exc).__name__}: {exc} (cause {type(exc.__cause__).__name__})")
        state = {s.id: s.state for s in higgs_patch.status()}["trainer-compute-loss"]
        higgs_patch.revert("trainer-compute-loss")
        import transformers.trainer
        print(json.dumps({"outcomes": outcomes, "state": state}))
        """
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout.strip().splitlines()[-1])
    first, second = data["outcomes"]
    assert first.startswith("PatchError: patch 'trainer-compute-loss' failed while installing on import")
    assert first.endswith("(cause ValueError)")
    assert second == first
    assert data["state"] == "not-applied"


def test_a_target_whose_code_cannot_be_read_is_refused_as_unknown_code(monkeypatch):
    declaration = engine.known()["forward-kwargs-filter"]
    gone = declarations.Target(FORWARD.replace(".forward", ".no_such_method"), declaration.targets[0].wrapper)
    monkeypatch.setitem(engine.known(), "forward-kwargs-filter", dataclasses.replace(declaration, targets=(gone,)))
    with pytest.raises(higgs_patch.IncompatibleUpstreamError, match="cannot fingerprint its targets"):
        higgs_patch.apply("forward-kwargs-filter")
    assert states()["forward-kwargs-filter"] == "incompatible"
    assert Model.__dict__["forward"] is ORIGINALS[FORWARD]


# --- version lines ([serves]) and added names (provides): the kinds the transformers-line shims use ---------------


@pytest.fixture
def declare(monkeypatch):
    """``declare(declaration)``: a declaration the engine knows during the test, reverted before it is forgotten."""
    declared = []

    def add(declaration):
        monkeypatch.setitem(engine.known(), declaration.id, declaration)
        declared.append(declaration.id)

    yield add
    if declared:
        higgs_patch.revert(*declared)


def line_declaration(serves: str, patch_id: str = "line-test", default: bool = False) -> declarations.Declaration:
    """forward-kwargs-filter's target and factory, under a [serves] of the test's choosing."""
    return declarations.load(declaration_text("higgs_patch.fixes.forward_kwargs_filter:filter_kwargs").replace(
        'id = "x"', f'id = "{patch_id}"').replace('symptom = "s"', f'symptom = "s"\ndefault = {str(default).lower()}')
        + serves)


@pytest.mark.parametrize("serves, needed_here", [
    ('[serves]\ntransformers = "<4"\n', False),
    ('[serves]\ntransformers = ">=4"\ntorch = "<1"\n', False),  # a table: every distribution in it
    ('[[serves]]\ntransformers = "<4"\n[[serves]]\ntransformers = ">=4"\n', True),  # an array: any one table
    # not installed, and no code of it anywhere (no checkout on the path either): this is not its line
    ('[serves]\nno-such-distribution = ">=1"\n', False),
    ('[serves]\ntransformers = ">=4"\n', True),
])
def test_a_patch_off_the_lines_it_serves_is_not_needed_and_on_them_applies(declare, serves, needed_here):
    declare(line_declaration(serves))
    (status,) = higgs_patch.apply("line-test")
    if needed_here:
        assert status.state == "applied" and isinstance(Model.__dict__["forward"], wrapt.FunctionWrapper)
        assert "line-test" in os.environ["HIGGS_PATCH_ACTIVATE"]
    else:
        assert status.state == "not-needed"
        assert status.reason.startswith("not needed here: it serves")
        assert transformers.__version__ in status.reason or "no-such-distribution None" in status.reason
        assert Model.__dict__["forward"] is ORIGINALS[FORWARD]  # neither applied nor refused
        assert "line-test" not in os.environ.get("HIGGS_PATCH_ACTIVATE", "")
    assert higgs_patch.revert("line-test")[0].state == "not-applied"
    assert originals_back()


def test_a_bare_apply_passes_over_a_default_patch_off_its_line_and_applies_the_rest(declare):
    declare(line_declaration('[serves]\ntransformers = "<4"\n', default=True))
    report = {s.id: s.state for s in higgs_patch.apply(*needed.ids(default_only=True), "line-test")}
    assert report.pop("line-test") == "not-needed"
    assert set(report.values()) == {"applied"}


ADDED = textwrap.dedent(
    """
    class Thing:
        def get_max_cache_shape(self):
            return 7

    class Defines(Thing):
        def get_max_length(self):
            return "its own"
    """
)


@pytest.fixture
def upstream_module(tmp_path, monkeypatch, request):
    """A package on sys.path, not yet imported, of its own name per test: classes that lack names the shims add."""
    name = f"addtarget_{request.node.name.split('[')[0][-40:]}"
    (tmp_path / name).mkdir()
    (tmp_path / name / "__init__.py").write_text(ADDED)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    for module in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[module]


def adds_declaration(path: str, factory: str, patch_id: str = "adds-test") -> declarations.Declaration:
    return declarations.load(textwrap.dedent(f"""
        id = "{patch_id}"
        version = "1.0.0"
        summary = "s"
        symptom = "s"
        default = false
        [[targets]]
        path = "{path}"
        provides = "{factory}"
        """))


def test_a_name_a_class_lacks_is_added_when_its_module_is_imported_and_removed_on_revert(declare, upstream_module):
    declare(adds_declaration(
        f"{upstream_module}:Thing.get_max_length", "higgs_patch.shims.cache_max_length:get_max_length"))
    assert higgs_patch.apply("adds-test")[0].state == "pending"  # before the import, as boson's needs it
    addtarget = __import__(upstream_module)

    assert states()["adds-test"] == "applied"
    assert addtarget.Thing().get_max_length() == 7  # the shim's alias of get_max_cache_shape()
    assert addtarget.Defines().get_max_length() == "its own"  # a subclass's own definition still wins
    higgs_patch.revert("adds-test")
    assert not hasattr(addtarget.Thing, "get_max_length")
    assert higgs_patch.apply("adds-test")[0].state == "applied"  # and again, on the imported module


def test_a_module_added_to_a_package_imports_by_its_dotted_name_until_revert(declare, upstream_module):
    declare(adds_declaration(
        f"{upstream_module}:modeling_attn_mask_utils", "higgs_patch.shims.attention_mask_converter:converter_module"))
    higgs_patch.apply("adds-test")
    added = f"{upstream_module}.modeling_attn_mask_utils"
    assert __import__(added, fromlist=["AttentionMaskConverter"]).AttentionMaskConverter  # the import is the test

    higgs_patch.revert("adds-test")
    assert added not in sys.modules
    with pytest.raises(ModuleNotFoundError):
        __import__(added)


def test_a_name_already_there_is_left_alone_and_the_patch_is_not_needed(declare, upstream_module, patch_log):
    addtarget = __import__(upstream_module)

    declare(adds_declaration(
        f"{upstream_module}:Thing.get_max_cache_shape", "higgs_patch.shims.cache_max_cache_shape:get_max_cache_shape"))
    own = vars(addtarget.Thing)["get_max_cache_shape"]
    (status,) = higgs_patch.apply("adds-test")
    assert status.state == "not-needed" and "is already there" in status.reason
    assert vars(addtarget.Thing)["get_max_cache_shape"] is own
    assert any("(already-there)" in r.getMessage() for r in patch_log.records)


def test_a_module_the_package_ships_on_disk_is_left_alone_and_named_by_its_file(declare, upstream_module, patch_log,
                                                                                tmp_path):
    """As transformers 5.25 ships modeling_attn_mask_utils again: the reason names the file (before issue 26:
    '(a submodule on disk from ?)')."""
    shipped = tmp_path / upstream_module / "modeling_attn_mask_utils.py"
    shipped.write_text("class AttentionMaskConverter:\n    pass\n")
    __import__(upstream_module)
    declare(adds_declaration(
        f"{upstream_module}:modeling_attn_mask_utils", "higgs_patch.shims.attention_mask_converter:converter_module"))
    (status,) = higgs_patch.apply("adds-test")
    assert status.state == "not-needed"
    assert f"(a submodule on disk: {shipped})" in status.reason and "?" not in status.reason
    assert f"{upstream_module}.modeling_attn_mask_utils" not in sys.modules  # found, not imported


def test_an_added_name_replaced_after_apply_is_left_in_place_on_revert(declare, upstream_module, patch_log):
    addtarget = __import__(upstream_module)

    declare(adds_declaration(
        f"{upstream_module}:Thing.get_max_length", "higgs_patch.shims.cache_max_length:get_max_length"))
    higgs_patch.apply("adds-test")

    def theirs(self):
        return "theirs"

    addtarget.Thing.get_max_length = theirs
    assert states()["adds-test"] == "bypassed"
    higgs_patch.revert("adds-test")
    assert vars(addtarget.Thing)["get_max_length"] is theirs
    assert any("replaced after higgs_patch" in r.getMessage() for r in patch_log.records)


def test_an_added_name_goes_with_the_rest_of_a_call_that_fails(declare, monkeypatch, upstream_module):
    addtarget = __import__(upstream_module)
    from higgs_patch.fixes import trainer_compute_loss

    declare(adds_declaration(
        f"{upstream_module}:Thing.get_max_length", "higgs_patch.shims.cache_max_length:get_max_length"))
    factory = engine.known()["trainer-compute-loss"].targets[-1].wrapper.partition(":")[2]

    def broken(original, options):
        raise RuntimeError("factory broke")

    monkeypatch.setattr(trainer_compute_loss, factory, broken)
    with pytest.raises(higgs_patch.PatchError, match="factory broke"):
        higgs_patch.apply("adds-test", "trainer-compute-loss")
    assert not hasattr(addtarget.Thing, "get_max_length")
    assert states()["adds-test"] == "not-applied"


@pytest.mark.parametrize("field, value, message", [
    ("provides", '"higgs_patch.shims.cache_max_length:get_max_length"\nwrapper = "higgs_patch.x:y"', "exactly one of"),
    ("provides", '"os:getcwd"', "inside the 'higgs_patch' package"),
    ("provides", '"higgs_patch.shims.cache_max_length:get_max_length"\norder = 2', "only applies to a wrapped target"),
])
def test_a_malformed_added_name_is_a_declaration_error(field, value, message):
    text = textwrap.dedent("""
        id = "x"
        version = "1.0.0"
        summary = "s"
        symptom = "s"
        [[targets]]
        path = "m:Thing.name"
        """) + f"{field} = {value}\n"
    with pytest.raises(higgs_patch.DeclarationError, match=message):
        declarations.load(text)


@pytest.mark.parametrize("serves, message", [
    ('[serves]\ntransformers = "4.48+"\n', "serves.transformers '4.48\\+' is not a PEP 440 specifier"),
    ('serves = []\n', "empty array"),
    ('[[serves]]\n', "is empty"),
    ('before_import = ["not a module"]\n', "list of module names"),
])
def test_a_malformed_line_or_import_order_is_a_declaration_error(serves, message):
    text = declaration_text("higgs_patch.fixes.forward_kwargs_filter:filter_kwargs")
    if serves.startswith(("before_import", "serves =")):
        text = text.replace('summary = "s"', 'summary = "s"\n' + serves)
    else:
        text += serves
    with pytest.raises(higgs_patch.DeclarationError, match=message):
        declarations.load(text)


def test_one_name_is_added_by_one_patch(tmp_path):
    for name in ("a", "b"):
        (tmp_path / f"{name}.toml").write_text(textwrap.dedent(f"""
            id = "{name}"
            version = "1.0.0"
            summary = "s"
            symptom = "s"
            [[targets]]
            path = "m:Thing.name"
            provides = "higgs_patch.shims.cache_max_length:get_max_length"
            """))
    with pytest.raises(higgs_patch.DeclarationError, match="also provided by"):
        declarations.load_all(tmp_path)


def test_one_apply_reads_each_installed_version_once_and_the_next_call_reads_them_afresh(monkeypatch):
    """Parsing a distribution's metadata costs a millisecond or more, and every patch names two or three."""
    import importlib.metadata

    real, reads = importlib.metadata.version, []

    def counting(name):
        reads.append(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "version", counting)
    for _ in range(2):
        higgs_patch.revert()
        higgs_patch.apply()
        assert reads and len(reads) == len(set(reads)), sorted(reads)
        assert {"transformers", "boson-multimodal"} <= set(reads)  # a pip install between two calls is seen
        reads.clear()
