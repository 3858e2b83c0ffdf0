"""``python -m nnconv``: the command line."""

from nnconv.converter.cli import main

main()
