"""Every error the plugin raises derives from PatchError, so one except clause catches them all."""

from __future__ import annotations


class PatchError(Exception):
    """A patch could not be declared, applied or reverted."""


class DataError(PatchError):
    """A data file shipped with the plugin (``patches/*.toml``, ``compat/*.toml``) is malformed."""


class DeclarationError(DataError):
    """A file in patches/ is malformed or points somewhere it must not."""


class OptionError(PatchError, ValueError):
    """An option or argument given to apply() is not one its declaration allows."""


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


class ConversionError(PatchError, ValueError):
    """A checkpoint cannot be converted strictly: a layout the other format cannot express, or weights that do not
    match their config. The message names what."""


class SampleError(PatchError, ValueError):
    """A conversation cannot become a training sample (``higgs_patch.training_sample``).

    The message names the message (its index and role) and what is wrong with it.
    """
