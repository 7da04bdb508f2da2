"""One module per fix, each reading top to bottom as symptom, cause, change.

Every module exposes wrapper factories ``factory(original, options) -> wrapper``, named by the
declarations in ``patches/``; a wrapper is wrapt's ``(wrapped, instance, args, kwargs)``. Layers on
the collator read their batch with :func:`collator_batch`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from ..errors import InputError


def collator_batch(args: tuple, kwargs: dict) -> tuple[list, tuple, dict]:
    """The samples a collator call was given, read once into a list, and the call's other arguments.

    Every layer on the collator reads its batch through this and hands the list on, so a one-shot
    iterable (a generator) is read once, whatever the layer order, and reaches upstream whole.
    """
    if args:
        batch, args = args[0], args[1:]
    elif "batch" in kwargs:
        kwargs = dict(kwargs)
        batch = kwargs.pop("batch")
    else:
        raise InputError("the collator was called without a batch: call it with a list of ChatMLDatasetSample")
    if isinstance(batch, (Mapping, str, bytes)) or not isinstance(batch, Iterable):
        raise InputError(
            f"the collator takes a list of ChatMLDatasetSample, got a {type(batch).__name__}: pass [sample] "
            "for one sample; a dict is already a collated batch"
        )
    samples = list(batch)
    if not samples:
        raise InputError(
            "the collator got an empty batch: collate at least one sample (if your dataset or sampler can "
            "filter out every sample of a batch, skip such batches there)"
        )
    return samples, args, kwargs
