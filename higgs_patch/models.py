"""The Higgs Audio model classes, one per upstream, that the Trainer's patches recognise in a module tree.

Two upstreams ship the network: Boson AI's ``boson_multimodal`` and transformers' own
``higgs_audio_v2`` (5.3 on). The Trainer patches (trainer-compute-loss) serve a model of either kind
wherever it sits (DDP, PEFT, a wrapper module); which class is which kind is data, here. A class is
looked up only in a module already imported: nothing is imported to answer.
"""

from __future__ import annotations

import sys
import weakref
from typing import Any

import torch

BOSON, NATIVE = "boson", "native"

#: kind -> (module, class name) of that upstream's trainable model.
CLASSES: dict[str, tuple[str, str]] = {
    BOSON: ("boson_multimodal.model.higgs_audio.modeling_higgs_audio", "HiggsAudioModel"),
    NATIVE: ("transformers.models.higgs_audio_v2.modeling_higgs_audio_v2", "HiggsAudioV2ForConditionalGeneration"),
}

_kinds: "weakref.WeakKeyDictionary[Any, str | None]" = weakref.WeakKeyDictionary()


def kind_of(model: Any) -> str | None:
    """The kind of the first Higgs Audio model in the module tree of ``model`` (cached per model), or None."""
    if not isinstance(model, torch.nn.Module):
        return None
    try:
        return _kinds[model]
    except KeyError:
        pass
    classes = {kind: getattr(sys.modules[module], name, None)
               for kind, (module, name) in CLASSES.items() if module in sys.modules}
    classes = {kind: cls for kind, cls in classes.items() if isinstance(cls, type)}
    found = next((kind for m in model.modules() for kind, cls in classes.items() if isinstance(m, cls)), None)
    if classes:  # before any upstream is imported there is nothing to remember
        _kinds[model] = found
    return found
