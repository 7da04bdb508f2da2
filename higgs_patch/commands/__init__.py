"""The commands: the ``higgs-patch`` CLI and what only it uses (doctor, smoke, learnability, memory, the tiny model).

They stand above the engine and the fixes: nothing below imports them (see the import contracts in
pyproject.toml).
"""
