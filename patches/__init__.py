"""Declarations: one TOML file per fix. Shipped in the wheel as ``higgs_patch.patches``; data, not code."""
