"""Commands that run or administer a server: `server`, `db upgrade`, `dashboard`, `token ...`, `project ...`."""

from __future__ import annotations

import os
import tempfile
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from tunefleet.cli.app import (
    CliError,
    client_for,
    command,
    db_app,
    project_app,
    read_token_file,
    settings,
    token_app,
)
from tunefleet.cli.app import app as root_app
from tunefleet.cli.render import console, err_console, records_table


class Role(str, Enum):
    admin = "admin"
    user = "user"
    worker = "worker"


@command(root_app)
def server(
    host: Annotated[str | None, typer.Option(help="Interface to bind (default: settings' host, 127.0.0.1)")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default: settings' port, 8000)")] = None,
    migrate: Annotated[bool | None, typer.Option(
        help="Upgrade the database schema before serving. Default: only for the embedded SQLite default; "
             "a configured database is upgraded with `tunefleet db upgrade`.")] = None,
    processes: Annotated[int | None, typer.Option(
        min=1, help="Server processes (PostgreSQL only; default: settings' server_processes, 1). About one "
                    "per CPU core when many workers call the server.")] = None,
) -> None:
    """Run the API server (uvicorn) on the configured database."""
    from tunefleet.service.api.app import run_server

    if migrate is None:
        migrate = settings().database_url is None
    code = run_server(host, port, migrate, processes)  # None: the settings' values
    if code:
        raise typer.Exit(code)


@command(db_app, "upgrade")
def db_upgrade() -> None:
    """Create or upgrade the tunefleet and Optuna tables (TUNEFLEET_DATABASE_URL)."""
    from tunefleet.service.db import upgrade_database

    revision = upgrade_database(settings())
    console.print(f"[green]database ready[/] at schema revision [bold]{revision}[/]")


@command(root_app)
def dashboard(
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8080,
) -> None:
    """Run optuna-dashboard on the server's database."""
    import optuna_dashboard

    # The settings' resolved URL is the server's own (a bare postgresql:// already names psycopg2).
    url = settings().resolved_database_url
    console.print(f"optuna-dashboard on [bold]http://{host}:{port}[/]")
    optuna_dashboard.run_server(url, host=host, port=port)


@command(token_app, "create")
def token_create(
    name: Annotated[str, typer.Option(help="Who or what uses the token, e.g. ci or node1.")],
    role: Annotated[Role, typer.Option(help="admin, user or worker.")],
    project: Annotated[list[str] | None, typer.Option(
        "--project", metavar="NAME[:read|write]",
        help="Grant a project (repeatable; access write unless :read). A user token sees only its projects; a "
             "worker token with projects leases only from them; admin tokens see everything.")] = None,
) -> None:
    """Create a token directly in the database (so the first admin token can be made); prints it once."""
    from tunefleet.service.auth import create_token

    plain = create_token(settings(), name, role.value, parse_grants(project or []))
    err_console.print(f"[green]created[/] {role.value} token [bold]{escape(name)}[/]; it is shown only now:")
    console.print(plain, soft_wrap=True, highlight=False)


# The tokens `token bootstrap` keeps in its folder, one file each: an admin's and the workers'.
BOOTSTRAP_ROLES = (Role.admin, Role.worker)


@command(token_app, "bootstrap")
def token_bootstrap(
    folder: Annotated[Path, typer.Argument(
        metavar="DIR", help="Folder of the token files admin.token and worker.token.")],
) -> None:
    """Make sure DIR/admin.token and DIR/worker.token hold tokens the database accepts, working on the database
    directly (like `token create`). A missing file gets a new token (mode 600); a file already there (a secret
    you generated, e.g. a mounted Kubernetes Secret) is registered when the database does not know it; a known
    one is left alone. Safe to run at every start (docker-compose.yml does); never prints a secret."""
    from tunefleet.service.auth import register_token

    for role in BOOTSTRAP_ROLES:
        path = folder / f"{role.value}.token"
        created = _write_new_token(path)
        secret = read_token_file(path, label="token bootstrap:")
        added = register_token(settings(), f"bootstrap-{role.value}", role.value, secret)
        state = "created" if created else "registered" if added else "already registered"
        console.print(f"{role.value} token {escape(str(path))}: {state}")


def _write_new_token(path: Path) -> bool:
    """Write a new secret to `path`, readable by its owner only, unless the file exists; whether it wrote one.
    The file appears whole or not at all (a hard link of a finished temporary file), so two bootstraps at
    once keep one secret."""
    from tunefleet.service.auth import new_token_secret

    if path.exists():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, draft = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mode 600
    try:
        with os.fdopen(fd, "w") as out:
            out.write(new_token_secret() + "\n")
        os.link(draft, path)
    except FileExistsError:
        return False
    finally:
        os.unlink(draft)
    return True


def parse_grants(options: list[str]) -> dict[str, str]:
    """`["research", "shared:read"]` -> `{"research": "write", "shared": "read"}`; CliError on a bad access."""
    grants = {}
    for option in options:
        name, _, access = option.partition(":")
        if access not in ("", "read", "write") or not name:
            raise CliError(f"--project {option!r}: write NAME, NAME:read or NAME:write")
        grants[name] = access or "write"
    return grants


@command(project_app, "create")
def project_create(name: Annotated[str, typer.Argument(help="Letters, digits, _ . - (as a study name).")]) -> None:
    """Create a project directly in the database (admin; like `token create`)."""
    from tunefleet.service.auth import add_project

    project_id = add_project(settings(), name)
    console.print(f"[green]created[/] project [bold]{escape(name)}[/] (id {project_id})")


@command(project_app, "ls")
def project_ls(ctx: typer.Context) -> None:
    """List the projects this token may see, with its access to each."""
    console.print(records_table(client_for(ctx).list_projects(), title="projects"))


@command(token_app, "ls")
def token_ls(ctx: typer.Context) -> None:
    """List tokens (admin)."""
    console.print(records_table(client_for(ctx).list_tokens(), title="tokens"))


@command(token_app, "revoke")
def token_revoke(ctx: typer.Context, token_id: Annotated[int, typer.Argument(help="Token id.")]) -> None:
    """Revoke a token (admin)."""
    client_for(ctx).revoke_token(token_id)
    console.print(f"[green]revoked[/] token {token_id}")


