"""`tunefleet data ...` and `tunefleet model ...`: upload a data set or a base model to the server's store, list,
show and delete them. A spec then names one as `tunefleet://NAME` (pinned to its newest version when the study is
created), and every worker fetches it from the server, whatever node it runs on."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from tunefleet.cli.app import app as root_app
from tunefleet.cli.app import client_for, command
from tunefleet.cli.render import console, err_console, kv_table, print_json, records_table

data_app = typer.Typer(no_args_is_help=True, help="Data sets in the server's store: upload, list, show, delete.")
model_app = typer.Typer(no_args_is_help=True, help="Base models in the server's store: upload, list, show, delete.")
root_app.add_typer(data_app, name="data")
root_app.add_typer(model_app, name="model")

NameOption = Annotated[str, typer.Option("--name", help="Letters, digits, _ . - (e.g. bbc-news); a spec names it "
                                                         "tunefleet://NAME.")]
NameArgument = Annotated[str, typer.Argument(help="The name it was uploaded under.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the raw JSON answer.")]


@command(data_app, "upload")
def data_upload(ctx: typer.Context,
                path: Annotated[Path, typer.Argument(help="A data file (jsonl, json, csv, parquet) or a folder.")],
                name: NameOption) -> None:
    """Upload a data set; its version is the SHA-256 of its files. A spec reads it as
    data.train: tunefleet://NAME (one file) or tunefleet://NAME/train.jsonl (a file of a folder)."""
    _upload(ctx, "datasets", path, name)


@command(model_app, "upload")
def model_upload(ctx: typer.Context,
                 path: Annotated[Path, typer.Argument(help="A model folder (config.json, weights, tokenizer files).")],
                 name: NameOption) -> None:
    """Upload a base model folder; its version is the SHA-256 of its files. A spec uses it as
    model: tunefleet://NAME."""
    _upload(ctx, "models", path, name)


def _upload(ctx: typer.Context, kind: str, path: Path, name: str) -> None:
    asset = client_for(ctx).upload_asset(kind, name, path)
    err_console.print(f"[green]uploaded[/] {escape(name)} version [bold]{asset['version']}[/] "
                      f"({len(asset['files'])} files, {asset['size'] / 2**20:.1f} MB)")
    console.print(f"tunefleet://{name}@{asset['version']}", soft_wrap=True, highlight=False)


@command(data_app, "ls")
def data_ls(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """List the uploaded data sets, every version, newest first."""
    _list(ctx, "datasets", as_json)


@command(model_app, "ls")
def model_ls(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """List the uploaded models, every version, newest first."""
    _list(ctx, "models", as_json)


def _list(ctx: typer.Context, kind: str, as_json: bool) -> None:
    assets = client_for(ctx).list_assets(kind)
    if as_json:
        print_json(assets)
        return
    console.print(records_table([_row(a) for a in assets], title=kind))


@command(data_app, "show")
def data_show(ctx: typer.Context, name: NameArgument, as_json: JsonOption = False) -> None:
    """The versions of one data set and the files of the newest."""
    _show(ctx, "datasets", name, as_json)


@command(model_app, "show")
def model_show(ctx: typer.Context, name: NameArgument, as_json: JsonOption = False) -> None:
    """The versions of one model and the files of the newest."""
    _show(ctx, "models", name, as_json)


def _show(ctx: typer.Context, kind: str, name: str, as_json: bool) -> None:
    versions = client_for(ctx).list_assets(kind, name)
    if as_json:
        print_json(versions)
        return
    console.print(records_table([_row(a) for a in versions], title=f"{name}: versions"))
    console.print(kv_table({f["name"]: f["size"] for f in versions[0]["files"]},
                           title=f"files of {versions[0]['version']} (bytes)"))


VersionArgument = Annotated[str, typer.Argument(help="The version to delete (its hex digits, as `show` lists them).")]


@command(data_app, "rm")
def data_rm(ctx: typer.Context, name: NameArgument, version: VersionArgument) -> None:
    """Delete one version of a data set (admin token). Refused while a running or paused study uses it; a
    finished study keeps its results but cannot be re-run from its spec."""
    _delete(ctx, "datasets", name, version)


@command(model_app, "rm")
def model_rm(ctx: typer.Context, name: NameArgument, version: VersionArgument) -> None:
    """Delete one version of a model (admin token). Refused while a running or paused study uses it; a
    finished study keeps its results but cannot be re-run from its spec."""
    _delete(ctx, "models", name, version)


def _delete(ctx: typer.Context, kind: str, name: str, version: str) -> None:
    asset = client_for(ctx).delete_asset(kind, name, version)
    err_console.print(f"[green]deleted[/] {escape(name)} version [bold]{asset['version']}[/]")


def _row(asset: dict[str, Any]) -> dict[str, Any]:
    return {"name": asset["name"], "version": asset["version"], "files": len(asset["files"]),
            "MB": round(asset["size"] / 2**20, 2), "created_at": asset["created_at"]}
