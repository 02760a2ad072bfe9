"""`python -m medhive`: the same as the `medhive` command."""

from medhive.cli import main

main()
