"""What this stack needs: the declarations on a line they serve here (compatibility shims off theirs are not needed)."""

from higgs_patch import engine, gate


def declarations(default_only: bool = False) -> list:
    return [d for d in engine.known().values() if not gate.off_line(d) and (d.default or not default_only)]


def ids(default_only: bool = False) -> list[str]:
    return [d.id for d in declarations(default_only)]


def not_needed() -> set[str]:
    """The ids of the patches a bare apply() passes over on this stack, as not needed."""
    return {d.id for d in engine.known().values() if gate.off_line(d)}


def every_shim() -> list[str]:
    """The ids of every compatibility shim declared, needed on this stack or not."""
    return [d.id for d in engine.known().values() if d.shim]


def shims() -> list[str]:
    """The compatibility shims (implemented in higgs_patch.shims) this stack needs: without them boson_multimodal
    does not import or run here. On the line it was written for (4.46) there are none."""
    return engine.shims_needed()


def beyond_shims() -> list:
    """status() less the shims this stack needs, which conftest keeps applied through every test (none on 4.46):
    what a test applied or left behind."""
    shims_here = set(shims())
    import higgs_patch

    return [s for s in higgs_patch.status() if s.id not in shims_here]
