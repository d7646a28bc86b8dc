"""`tunefleet`: the command line, a thin shell over `tunefleet.service.client.Client` (and, for `server`,
`db upgrade`, `token create` and `dashboard`, over the server's own modules, imported lazily).

One module per job: `app` (the Typer app, global options, the error policy), `render` (tables and
cells), `studies` (study and trial commands), `export` (export and the model card), `assets` (data sets and
base models), `admin` (server, database, dashboard, tokens) and `workers` (worker and demo). Importing this
package registers them all.
"""

from tunefleet.cli import admin, assets, export, studies, workers  # noqa: F401  (each module registers its commands)
from tunefleet.cli.app import app

__all__ = ["app"]
