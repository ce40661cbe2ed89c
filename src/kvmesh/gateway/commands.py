"""``kvmesh tenants ...``: helpers for the gateway's tenants file, registered by ``kvmesh.cli``.

``hash-key`` prints the SHA-256 a tenants file stores for an API key (``key_sha256``,
``admin_key_sha256``): the key itself is never written anywhere.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    tenants_app = typer.Typer(no_args_is_help=True, help="The gateway's tenants file: hash API keys.")
    app.add_typer(tenants_app, name="tenants")

    @tenants_app.command("hash-key")
    def hash_key_cmd(
        key: Annotated[str | None, typer.Argument(help="The API key; read from stdin when omitted (keeps it out "
                                                       "of the shell history)")] = None,
    ) -> None:
        """Print the key_sha256 line of a tenants file for an API key."""
        from kvmesh.gateway.tenants import hash_key

        raw = key if key is not None else sys.stdin.readline().strip()
        if not raw:
            typer.echo("kvmesh: error: give an API key (argument or one line on stdin)", err=True)
            raise typer.Exit(2)
        typer.echo(f'key_sha256 = ["{hash_key(raw)}"]')
