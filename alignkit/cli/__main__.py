"""`python -m alignkit.cli ...` (what each rank of a multi-process launch runs)."""

from alignkit.cli import main

main()
