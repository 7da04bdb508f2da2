"""The tested lines after the first of compat/matrix.toml, for .ci/run: one `line constraints suite` a row.

Run with the installed plugin's interpreter (``.venv/bin/python -P .ci/lines.py``): it reads the list
through the same code doctor does, so a malformed matrix fails CI here, naming the field.
"""

from higgs_patch import upstream

for stack in upstream.tested()[1:]:
    print(stack.line, stack.constraints, stack.suite)
