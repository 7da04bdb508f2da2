"""``python -m higgs_patch``: the ``higgs-patch`` command, for environments without its console script."""

from higgs_patch.commands.cli import main

main(prog_name="higgs-patch")
