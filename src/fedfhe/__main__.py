"""`python -m fedfhe` runs the CLI."""

from fedfhe.cli import main

main()
