"""`python -m tunefleet.cli`: the `tunefleet` command."""

from tunefleet.cli import app

app()
