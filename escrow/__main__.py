"""python -m escrow: the gimme-escrow command."""

from escrow.cli import main

main()
