"""One module per fix of transformers' own Higgs Audio v2 (``transformers.models.higgs_audio_v2``, 5.3 on).

The same engine serves these as the fixes of boson's model in :mod:`higgs_patch.fixes`; the two sets
never import each other (pyproject.toml's independence contract). Each module reads symptom, cause,
change, and exposes wrapper factories ``factory(original, options) -> wrapper`` named by the
declarations ``patches/native-*.toml``.
"""
