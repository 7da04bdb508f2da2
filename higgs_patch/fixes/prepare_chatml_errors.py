"""prepare-chatml-errors

Symptom: boson's ``prepare_chatml_sample`` on a malformed conversation (a user message with a
``recipient``, a content of the wrong type) raises ``TypeError: Object of type ChatMLSample is not JSON
serializable``, or, given a dict that is not a ``ChatMLSample``, returns ``(None, None, None, None)``
after printing; the real error is only in what it printed.

Cause: both of its ``except`` blocks print the error, then print ``json.dumps`` of the sample. A
``ChatMLSample`` is not JSON-serializable, so that raises a ``TypeError`` over the real error; a dict is,
so the function goes on to return its Nones.

Change: the dataset module's ``json.dumps`` (a view inside that module only; its fingerprint pins that
the module calls it in those two ``except`` blocks and nowhere else) raises the error being handled
instead of serializing: the caller gets the real exception with its traceback. With no error being
handled it serializes as before.
"""

from __future__ import annotations

import sys
from typing import Any, Mapping


def raise_handled_error(original: Any, options: Mapping[str, Any]):
    """Layer on the module's ``json``: ``dumps`` inside an ``except`` block re-raises what it handles."""

    def wrapper(wrapped, instance, args, kwargs):
        handled = sys.exc_info()[1]
        if handled is not None:
            raise handled
        return wrapped(*args, **kwargs)

    return wrapper
