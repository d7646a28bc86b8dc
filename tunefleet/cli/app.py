"""The `tunefleet` Typer application: its command groups, the global `--server`/`--token` options and the
error policy every command follows.

Every error a user can cause or meet (an API error, an unreachable server, a bad spec file, a
database that is not ready) prints one red line and exits with status 1; never a traceback.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from rich.markup import escape

from tunefleet.cli.render import err_console
from tunefleet.service.client import ApiError, Client

__all__ = ["CliError", "ServerOption", "TokenOption", "app", "client_for", "command", "connection", "db_app",
           "project_app", "read_token_file", "settings", "study_app", "token_app", "trial_app", "warn"]

app = typer.Typer(name="tunefleet", no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Hyperparameter optimisation service for fine-tuning language models.")
db_app = typer.Typer(no_args_is_help=True, help="Database schema.")
study_app = typer.Typer(no_args_is_help=True, help="Create, watch and manage studies.")
trial_app = typer.Typer(no_args_is_help=True, help="Inspect trials.")
token_app = typer.Typer(no_args_is_help=True, help="API tokens.")
project_app = typer.Typer(no_args_is_help=True, help="Projects: who may see and change which studies.")
app.add_typer(db_app, name="db")
app.add_typer(study_app, name="study")
app.add_typer(trial_app, name="trial")
app.add_typer(token_app, name="token")
app.add_typer(project_app, name="project")

F = TypeVar("F", bound=Callable[..., Any])
# Modules only the `worker` extra installs: a missing one gets an install hint.
WORKER_EXTRAS = frozenset({"torch", "transformers", "peft", "accelerate", "datasets", "safetensors", "sklearn"})


class CliError(Exception):
    """A user-facing problem detected by the CLI itself (a missing file, nothing to export...)."""


# -- errors: one red line, exit 1 ---------------------------------------------------------------


def _expected_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [ApiError, CliError, OSError, ValueError]
    try:  # the server's domain errors (database not ready, bad role...), when the server is installed
        from tunefleet.service.errors import TunefleetError

        errors.append(TunefleetError)
    except ImportError:
        pass
    return tuple(errors)


def _fail(message: str) -> NoReturn:
    err_console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    raise typer.Exit(1)


def warn(message: str) -> None:
    """One yellow line on stderr; the command goes on."""
    err_console.print(f"[bold yellow]warning:[/] {escape(message)}", soft_wrap=True)


def friendly_errors(func: F) -> F:
    """Turn expected exceptions into one red line and exit status 1; Ctrl-C exits 130 quietly."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None
        except ModuleNotFoundError as exc:
            hint = " (pip install 'tunefleet[worker]')" if (exc.name or "").split(".")[0] in WORKER_EXTRAS else ""
            _fail(f"{exc}{hint}")
        except _expected_errors() as exc:
            message = exc.message if isinstance(exc, ApiError) else str(exc)
            _fail(message or type(exc).__name__)

    return wrapper  # type: ignore[return-value]


def command(group: typer.Typer, name: str | None = None, **kwargs: Any) -> Callable[[F], F]:
    """`group.command(name)` with `friendly_errors` applied: every command handles errors one way."""

    def register(func: F) -> F:
        group.command(name, **kwargs)(friendly_errors(func))
        return func

    return register


# -- global options -----------------------------------------------------------------------------


@dataclass
class _Connection:
    server: str | None
    token: str | None


ServerOption = Annotated[str | None, typer.Option(
    "--server", envvar="TUNEFLEET_SERVER", help="Server URL (default: settings' server_url, http://127.0.0.1:8000)",
    show_default=False)]
TokenOption = Annotated[str | None, typer.Option(
    "--token", envvar="TUNEFLEET_TOKEN", help="Bearer token (needed when the server has auth on).",
    show_default=False)]


@app.callback()
def main(ctx: typer.Context, server: ServerOption = None, token: TokenOption = None) -> None:
    """tunefleet: Optuna studies on a server, trials on any number of GPU workers."""
    ctx.obj = _Connection(server, token)


def settings() -> Any:
    """The server's settings (`tunefleet.service.config.Settings`: TUNEFLEET_* variables and `.env`)."""
    from tunefleet.service.config import Settings

    return Settings()


def connection(ctx: typer.Context, server: str | None = None, token: str | None = None) -> tuple[str, str | None]:
    """The server URL and token: the command's own options, then the global ones, then the settings."""
    root = ctx.find_root().obj or _Connection(None, None)
    server = server or root.server
    token = token or root.token
    if server is None or token is None:
        try:  # TUNEFLEET_SERVER_URL / TUNEFLEET_TOKEN / .env, through the one settings class
            configured = settings()
            server, token = server or configured.server_url, token or configured.token
        except ImportError:
            pass
    return server or "http://127.0.0.1:8000", token


def read_token_file(path: Path, label: str = "--token-file") -> str:
    """The token in `path`, surrounding whitespace stripped; CliError (naming `label`, the option or command
    that gave the path) when it is missing, unreadable or empty."""
    try:
        token = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise CliError(f"{label} {path}: no such file") from None
    except IsADirectoryError:
        raise CliError(f"{label} {path}: is a folder, not a file") from None
    except PermissionError:
        raise CliError(f"{label} {path}: permission denied (this user cannot read it)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CliError(f"{label} {path}: cannot read it ({exc})") from None
    if not token:
        raise CliError(f"{label} {path} is empty: write the token into it (`tunefleet token create` "
                       "prints one)")
    if any(c.isspace() for c in token):
        raise CliError(f"{label} {path} holds more than one word: it must hold only the token")
    return token


def client_for(ctx: typer.Context) -> Client:
    """A client for the server the command line names."""
    server, token = connection(ctx)
    # Interactive: fail within seconds rather than the workers' patient default.
    return Client(server, token, retries=2)
