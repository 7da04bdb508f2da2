"""One module per fix, each reading top to bottom as symptom, cause, change.

Every module exposes wrapper factories ``factory(original, options) -> wrapper``, named by the
declarations in ``patches/``; a wrapper is wrapt's ``(wrapped, instance, args, kwargs)``.
"""
