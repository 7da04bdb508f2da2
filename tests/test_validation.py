"""Issue 13, validation: options checked at apply(), declarations and compat/ data read strictly."""

from __future__ import annotations

import json
import math
import os
import textwrap

import pytest

import higgs_patch
import needed
from higgs_patch import declarations, engine, schema, upstream
from higgs_patch.errors import DataError, DeclarationError, OptionError

# --- options at apply() --------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, float("1e400"), -0.5, True, "0.5", "abc", None, [1]])
@pytest.mark.parametrize("name", ["text_loss_weight", "audio_loss_weight"])
def test_a_loss_weight_that_is_not_a_finite_non_negative_number_or_false_is_refused_by_apply(name, value):
    published = os.environ.get("HIGGS_PATCH_ACTIVATE")  # the shims this line needs, or nothing (4.46)
    with pytest.raises(OptionError) as caught:
        higgs_patch.apply(**{name: value})
    message = str(caught.value)
    assert name in message and "model-loss" in message
    assert "finite number >= 0, or false" in message
    assert {s.state for s in needed.beyond_shims()} <= {"not-applied"}
    assert os.environ.get("HIGGS_PATCH_ACTIVATE") == published  # nothing of the refused call published


@pytest.mark.parametrize("value", [0, 0.5, 2, False])
def test_a_valid_loss_weight_is_applied_and_published_as_valid_json(value):
    higgs_patch.apply("model-loss", text_loss_weight=value)
    options = {s.id: s.options for s in higgs_patch.status()}["model-loss"]
    assert options == {"text_loss_weight": value, "audio_loss_weight": False}

    def no_constants(name):
        raise AssertionError(f"{name} published: not JSON")

    published = json.loads(os.environ["HIGGS_PATCH_ACTIVATE"], parse_constant=no_constants)
    assert published["patches"]["model-loss"]["text_loss_weight"] == value


@pytest.mark.parametrize(
    "value,hint",
    [("Strict", "case-sensitive: did you mean 'strict'"), ("strct", "did you mean 'strict'"), ("", ""), (1, "")],
)
def test_audio_index_policy_must_be_one_of_its_choices_exactly(value, hint):
    with pytest.raises(OptionError) as caught:
        higgs_patch.apply("collator-audio-index", audio_index_policy=value)
    message = str(caught.value)
    assert "audio_index_policy" in message and "'clamp', 'clamp-always', 'strict'" in message
    assert hint in message
    assert {s.id: s.state for s in higgs_patch.status()}["collator-audio-index"] == "not-applied"


@pytest.mark.parametrize("force", ["no", "false", 0, 1, None])
def test_force_must_be_a_real_bool(force):
    with pytest.raises(OptionError, match="force must be True or False"):
        higgs_patch.apply(force=force)
    assert {s.state for s in needed.beyond_shims()} <= {"not-applied"}


# --- declarations ------------------------------------------------------------------------------------------


GOOD = textwrap.dedent(
    """
    id = "x"
    version = "1.0.0"
    summary = "s"
    symptom = "s"
    default = false

    [[targets]]
    path = "boson_multimodal.model.higgs_audio.modeling_higgs_audio:HiggsAudioModel.forward"
    wrapper = "higgs_patch.fixes.forward_kwargs_filter:filter_kwargs"

    [options.level]
    default = "low"
    choices = ["low", "high"]

    [requires]
    boson-multimodal = ">=0.1.0"
    """
)


def test_the_reference_declaration_is_valid():
    declaration = declarations.load(GOOD, "patches/x.toml")
    assert declaration.default is False
    assert declaration.defaults == {"level": "low"}
    assert str(declaration.requires["boson-multimodal"]) == ">=0.1.0"


TARGETS = """[[targets]]
path = "boson_multimodal.model.higgs_audio.modeling_higgs_audio:HiggsAudioModel.forward"
wrapper = "higgs_patch.fixes.forward_kwargs_filter:filter_kwargs"
"""


@pytest.mark.parametrize(
    "old,new,expected",
    [
        ("default = false", "defualt = false", "unknown field 'defualt'.*did you mean 'default'"),
        ("default = false", 'default = "false"', "field 'default' must be true or false, not the string 'false'"),
        ('version = "1.0.0"', "version = 1.0", "field 'version' must be a string"),
        ("[requires]\nboson-multimodal", "# no table\nboson-multimodal", "unknown field 'boson-multimodal'"),
        ('wrapper = "higgs_patch.fixes.forward_kwargs_filter:filter_kwargs"',
         'wrapper = "higgs_patch.fixes.forward_kwargs_filter:filter_kwargs"\nrequires = { boson-multimodal = ">=0.1" }',
         r"targets\[0\]: field 'requires' is misplaced here; it belongs at the top level"),
        ('choices = ["low", "high"]', 'choices = ["low", "high"]\ndefualt = "high"', r"options.level: unknown field 'defualt'"),
        ('default = "low"', 'default = "medium"', r"options.level: its default 'medium' is not one of 'low', 'high'"),
        ('[options.level]\ndefault = "low"\nchoices = ["low", "high"]', '[options]\nlevel = "low"',
         r"options.level must be a table such as \[options.level\]"),
        ('choices = ["low", "high"]', 'type = "number"\nminimum = 0', r"options.level: its default str 'low' is not a finite number"),
        ('boson-multimodal = ">=0.1.0"', "boson-multimodal = 1", r"requires.boson-multimodal must be a string"),
        ('boson-multimodal = ">=0.1.0"', 'boson-multimodal = "newest"', r"requires.boson-multimodal 'newest' is not a PEP 440"),
        ('id = "x"', 'id = "X Y"', "field 'id' 'X Y' must be lower-case"),
        ('summary = "s"', "summary = [1]", "field 'summary' must be a string, not the array"),
        (TARGETS, 'targets = "none"', "field 'targets' must be an array"),
        ('id = "x"', "", "missing required field.*'id'"),
        (TARGETS, 'targets = ["a"]', r"targets\[0\] must be a table, not the string 'a'"),
        ('wrapper = "higgs_patch.fixes.forward_kwargs_filter:filter_kwargs"',
         'wrapper = "higgs_patch.fixes.forward_kwargs_filter:filter_kwargs"\nnames = "full"', r"targets\[0\]: field 'names' must be an array"),
        ('version = "1.0.0"', 'version = "one"', "is not a PEP 440 version"),
    ],
)
def test_a_malformed_declaration_is_an_error_naming_the_file_and_the_field(old, new, expected):
    assert old in GOOD
    with pytest.raises(DeclarationError, match=expected) as caught:
        declarations.load(GOOD.replace(old, new, 1), "patches/x.toml")
    assert str(caught.value).startswith("patches/x.toml")


@pytest.mark.parametrize(
    "line,expected",
    [('requires = ">=0.1.0"', "field 'requires' must be a table, not the string '>=0.1.0'"),
     ("options = 3", "field 'options' must be a table, not the value 3"),
     ('options = { level = "low" }', r"options.level must be a table such as \[options.level\]")],
)
def test_a_field_that_must_be_a_table_and_is_not_is_an_error_naming_it(line, expected):
    text = GOOD[: GOOD.index("[[targets]]")] + line + "\n" + TARGETS
    with pytest.raises(DeclarationError, match=expected) as caught:
        declarations.load(text, "patches/x.toml")
    assert str(caught.value).startswith("patches/x.toml")


def test_two_declarations_of_one_option_are_an_error_naming_both_files(tmp_path):
    (tmp_path / "a.toml").write_text(GOOD)
    (tmp_path / "b.toml").write_text(GOOD.replace('id = "x"', 'id = "y"'))
    with pytest.raises(DeclarationError, match=r"patches/b.toml: option 'level' is also declared by patches/a.toml"):
        declarations.load_all(tmp_path)
    (tmp_path / "b.toml").write_text(GOOD.replace('id = "x"', 'id = "y"').replace("options.level", "options.other"))
    assert set(declarations.load_all(tmp_path)) == {"x", "y"}


def test_a_malformed_declaration_fails_apply_before_anything_is_applied(tmp_path, monkeypatch):
    shims_here = set(needed.shims())  # kept applied by conftest; read before the declarations break
    for declaration in engine.known().values():
        (tmp_path / f"{declaration.id}.toml").write_text(
            (declarations.resources.files("higgs_patch.patches") / f"{declaration.id}.toml").read_text()
        )
    broken = tmp_path / "sparse-text-logits.toml"
    broken.write_text(broken.read_text().replace("default = false", "defualt = false"))
    monkeypatch.setattr(engine, "_declarations", None)
    real = declarations.load_all
    monkeypatch.setattr(declarations, "load_all", lambda: real(tmp_path))
    before = dict(os.environ)
    with pytest.raises(DeclarationError, match="sparse-text-logits.toml: unknown field 'defualt'"):
        higgs_patch.apply()
    assert engine._declarations is None
    assert {k: v for k, v in os.environ.items() if k.startswith("HIGGS")} == {
        k: v for k, v in before.items() if k.startswith("HIGGS")}
    assert all(record.state != "applied" for pid, record in engine._records.items() if pid not in shims_here)


def test_every_shipped_declaration_reads_under_the_strict_schema():
    table = declarations.load_all()
    assert table["sparse-text-logits"].default is False
    assert table["collator-audio-index"].options["audio_index_policy"].choices == ("clamp", "clamp-always", "strict")


# --- compat/ data ----------------------------------------------------------------------------------------------


@pytest.fixture
def compat_text(monkeypatch):
    """``compat_text(name, text)``: compat/<name> reads as ``text`` (the caches are cleared around it)."""
    real = schema.read
    replaced: dict[str, str] = {}

    def read(package, name, source):
        if name in replaced:
            return schema.loads(replaced[name], source)
        return real(package, name, source)

    caches = (upstream.knowledge, upstream.known_bad, upstream.tested)
    monkeypatch.setattr(upstream.schema, "read", read)
    for cache in caches:
        cache.cache_clear()
    yield replaced.__setitem__
    monkeypatch.undo()
    for cache in caches:
        cache.cache_clear()


FINGERPRINTS = (declarations.resources.files("higgs_patch.compat") / "fingerprints.toml").read_text()
MATRIX = (declarations.resources.files("higgs_patch.compat") / "matrix.toml").read_text()


@pytest.mark.parametrize(
    "old,new,expected",
    [
        ("fingerprinted = [", "fingerprinted = [[", "not valid TOML"),
        ('fingerprinted = ["boson_multimodal"', 'fingerprinted = "boson_multimodal" #', "field 'fingerprinted' must be an array"),
        ('fingerprinted = [', 'relases = []\nfingerprinted = [', "unknown field 'relases'"),
        ('"ast1:8fc77fb28d181de969fdfd90"', "12", r"release\[0\].*targets.*must be a string, not the value 12"),
        ('"ast1:8fc77fb28d181de969fdfd90"', '"8fc77fb28d181de969fdfd90"', r"release\[0\].*expected 'module:Qualified.name' = \"ast1:"),
        ('origin = "PyPI wheel (CRLF line endings)"', "origin = 3", r"release\[0\]: field 'origin' must be a string"),
    ],
)
def test_junk_fingerprints_are_a_data_error_naming_the_file_and_never_an_unknown_upstream(compat_text, old, new, expected):
    assert old in FINGERPRINTS
    compat_text("fingerprints.toml", FINGERPRINTS.replace(old, new, 1))
    with pytest.raises(DataError, match=expected) as caught:
        upstream.knowledge()
    assert str(caught.value).startswith("compat/fingerprints.toml")
    with pytest.raises(DataError, match=expected):
        higgs_patch.apply(force=True)  # force patches unknown code, never over unreadable knowledge
    assert {s.state for s in needed.beyond_shims()} <= {"not-applied"}


def test_no_release_at_all_is_a_data_error(compat_text):
    compat_text("fingerprints.toml", 'fingerprinted = ["boson_multimodal"]\n')
    with pytest.raises(DataError, match="compat/fingerprints.toml: no \\[\\[release\\]\\] entries"):
        higgs_patch.apply()


@pytest.mark.parametrize(
    "old,new,expected",
    [
        ('works = ">=0.26"', 'works = "recent"', r"known-bad\[1\].works: 'recent' is not a PEP 440 specifier"),
        ('works = ">=0.26"', 'works = ">=0.26"\nseverity = "high"', r"known-bad\[1\]: unknown field 'severity'"),
        ('when = { torch = ">=2.5",', 'when = { torch = 2,', r"known-bad\[2\].when.torch must be a string"),
        ('torch = "2.13.0+cpu"', "torch = 2.13", r"tested\[0\].torch must be a string"),
        ('distribution = "accelerate"\n', "", r"known-bad\[1\]: missing required field.*'distribution'"),
        ('suite = "core"', 'suite = "quick"', r"tested\[1\].suite: 'quick' is not one of 'full', 'core'"),
        ('line = "4.47"\n', "", r"tested\[1\]: missing line \(every tested stack has line, constraints, suite"),
        ('line = "4.47"', 'line = "4.46"', r"tested\[1\].line: '4.46' is listed twice"),
    ],
)
def test_junk_in_the_matrix_is_a_data_error_naming_the_file_and_the_field(compat_text, old, new, expected):
    assert old in MATRIX
    compat_text("matrix.toml", MATRIX.replace(old, new, 1))
    with pytest.raises(DataError, match=expected) as caught:
        upstream.known_bad()
    assert str(caught.value).startswith("compat/matrix.toml")
