"""`python -m argon` runs the CLI."""

from argon.cli.main import main

main()
