"""What we know of upstream: fingerprints per release, the tested matrix, pinning constraints.

Shipped in the wheel as ``higgs_patch.compat``; data, not code.
"""
