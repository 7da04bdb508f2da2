"""generation-kwargs (transformers 4.53 and later)

Symptom: ``AttributeError: 'GenerationConfig' object has no attribute 'generation_kwargs'`` at the
start of ``HiggsAudioModel.generate``.

Cause: boson keeps its generation state (audio bos/eos ids, the seed, repetition-aware sampling)
in ``generation_config.generation_kwargs``, a dictionary every ``GenerationConfig`` had until 4.52;
4.53 dropped the field.

Change: while ``HiggsAudioModel.generate`` runs, the generation config transformers prepares for it
has that dictionary (empty, as 4.52 made it, unless the config given already holds one). Other
models' generation configs are untouched.
"""

from __future__ import annotations

import contextvars
from typing import Any, Callable, Mapping

from . import scope

FIELD = "generation_kwargs"

_in_boson_generate: contextvars.ContextVar[bool] = contextvars.ContextVar("higgs_patch_boson_generate", default=False)

#: Layer on ``HiggsAudioModel.generate``: the configs prepared inside it get the field.
scope_generate = scope(_in_boson_generate, "HiggsAudioModel.generate")


def keep_field(original: Callable[..., Any], options: Mapping[str, Any]):
    """Layer on ``GenerationMixin._prepare_generation_config``: inside boson's generate, the field is there."""

    def wrapper(wrapped, instance, args, kwargs):
        prepared = wrapped(*args, **kwargs)
        if _in_boson_generate.get():
            config = prepared[0] if isinstance(prepared, tuple) else prepared
            if not isinstance(getattr(config, FIELD, None), dict):
                setattr(config, FIELD, {})
        return prepared

    return wrapper
