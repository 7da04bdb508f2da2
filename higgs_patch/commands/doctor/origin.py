"""Where boson_multimodal comes from: installed or a checkout, shadowed or not, and why it cannot be imported.

When its import fails because of another distribution (a transformers it does not work with), the
check names that one and the versions that work.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from ... import install_advice
from .. import provenance
from .report import FAIL, OK, WARN, Check, one_line, raised_at, installed_version
from .stack import rule_for

UPSTREAM = "boson_multimodal"
UPSTREAM_DISTRIBUTION = "boson-multimodal"


def check_upstream(facts: dict[str, Any], imported: dict[str, Any]) -> Check:
    distribution = provenance.distribution_of(UPSTREAM)
    version = distribution.version if distribution else None
    info: dict[str, Any] = {
        "installed": version is not None, "version": version, "importable": False, "error": None,
        "location": None, "editable": False, "url": None, "commit": None, "checkout": None,
    }
    facts[UPSTREAM] = info
    failures = [(n, m) for n, m in imported.items() if n.split(".")[0] == UPSTREAM and isinstance(m, BaseException)]
    install = install_advice.install_fix([(UPSTREAM_DISTRIBUTION, "")])
    if failures:
        name, exc = failures[0]
        info["error"] = one_line(exc)
        culprit = (getattr(exc, "name", None) or "").split(".")[0]
        if isinstance(exc, ModuleNotFoundError) and culprit == UPSTREAM and version is None:
            if _native_model():
                return Check(UPSTREAM, WARN, "not installed: its patches are not needed here; transformers' own "
                             "Higgs Audio v2 is served by the native-* patches", install)
            return Check(UPSTREAM, FAIL, "not installed", install)
        installed = f"{version} is installed but " if version else ""
        detail = f"{installed}{name} cannot be imported: {one_line(exc)} (raised at {raised_at(exc)})"
        blamed = _dependency_at_fault(culprit) if isinstance(exc, ImportError) and culprit != UPSTREAM else None
        if blamed:
            return Check(UPSTREAM, FAIL, f"{detail}; the cause is {blamed[0]}", blamed[1])
        if isinstance(exc, ModuleNotFoundError) and culprit and culprit != UPSTREAM:
            fix = f"install {exc.name!r}, which boson_multimodal imports: pip install \"higgs-patch[upstream]\""
        else:
            fix = f"reinstall it: pip uninstall -y {UPSTREAM_DISTRIBUTION} && {install}"
        return Check(UPSTREAM, FAIL, detail, fix)
    package = sys.modules.get(UPSTREAM)
    if package is None:  # no patch targets it: nothing to check
        return Check(UPSTREAM, OK if version else WARN, version or "not installed")
    location = Path(package.__file__).resolve().parent
    info.update(importable=True, location=str(location), **provenance.origin(distribution, location))
    where = f"{version or 'no distribution metadata'} from {location}"
    origin = provenance.describe(info)
    shadowed = provenance.shadowed(distribution, location)
    if shadowed:
        return Check(
            UPSTREAM, WARN, f"{where} ({origin}), not from the installed distribution at {shadowed}",
            "check PYTHONPATH and the working directory: they put another copy first",
        )
    return Check(UPSTREAM, OK, f"{where} ({origin})")


def _dependency_at_fault(module: str) -> tuple[str, str] | None:
    """(why, fix) when an import boson_multimodal makes fails because the distribution providing
    ``module`` is a version it does not work with (compat/matrix.toml, else its own requirements)."""
    names = importlib.metadata.packages_distributions().get(module, [module]) if module else []
    for name in names:
        version = installed_version(name)
        rule = rule_for(name)
        works, fix = (rule.works, rule.fix) if rule else (_upstream_requirement(name), "")
        if version and works and not SpecifierSet(works).contains(version, prereleases=True):
            why = f"{name} {version}: boson_multimodal works with {name}{SpecifierSet(works)}"
            return why, fix or install_advice.install_fix([(name, works)])
    return None


def _upstream_requirement(distribution: str) -> str:
    """boson-multimodal's own requirement on ``distribution``, "" when it has none."""
    if installed_version(UPSTREAM_DISTRIBUTION) is None:
        return ""
    for line in importlib.metadata.requires(UPSTREAM_DISTRIBUTION) or ():
        requirement = Requirement(line)
        if canonicalize_name(requirement.name) == canonicalize_name(distribution) and requirement.marker is None:
            return str(requirement.specifier)
    return ""


def _native_model() -> bool:
    """Whether transformers ships its own Higgs Audio v2 here (5.3 on), which the native-* patches serve."""
    try:
        return importlib.util.find_spec("transformers.models.higgs_audio_v2") is not None
    except ModuleNotFoundError:
        return False
