"""`python -m tunefleet`: the `tunefleet` command."""

from tunefleet.cli import app

app()
