"""Every error the plugin raises derives from PatchError, so one except clause catches them all."""

from __future__ import annotations


class PatchError(Exception):
    """A patch could not be declared, applied or reverted."""


class DeclarationError(PatchError):
    """A file in patches/ is malformed or points somewhere it must not."""


class IncompatibleUpstreamError(PatchError):
    """The gate refused a patch: the installed stack or the target's code is not one we know."""


class AudioIndexError(PatchError, IndexError):
    """A sample's audio tokens cannot be mapped onto its audio segments without corrupting training.

    Also an IndexError, so code that already catches upstream's IndexError keeps working.
    """


class InputError(PatchError, ValueError):
    """A batch handed to the collator, or an output and batch handed to the loss, cannot be used as given.

    The message says what is wrong and what to pass instead. Also a ValueError, as upstream's own
    complaints about such input are.
    """
