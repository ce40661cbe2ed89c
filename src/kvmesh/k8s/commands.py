"""``kvmesh operator`` and ``kvmesh k8s manifests``: typer commands over ``kvmesh.k8s`` (registered by
``kvmesh.cli``).  Imports of the ``k8s`` extra (kubernetes_asyncio, PyYAML) happen inside the commands."""

from __future__ import annotations

import asyncio
import logging
import pathlib
from typing import Annotated

import typer

from kvmesh.cli_options import fail

k8s_app = typer.Typer(no_args_is_help=True, help="Kubernetes: manifests for kubectl apply.")


def _need_extra() -> None:
    try:
        import kubernetes_asyncio  # noqa: F401
        import yaml  # noqa: F401
    except ImportError:
        fail("the Kubernetes commands need the k8s extra: pip install 'kvmesh[k8s]'", 1)


@k8s_app.command("manifests")
def manifests(
    values: Annotated[pathlib.Path | None, typer.Option(help="YAML values (the Helm chart's values.yaml "
                                                             "keys); flags below override")] = None,
    namespace: Annotated[str | None, typer.Option(help="Namespace of the operator")] = None,
    image: Annotated[str | None, typer.Option(help="kvmesh image")] = None,
    model_service: Annotated[pathlib.Path | None, typer.Option(help="Print instead the objects this "
                                                                    "ModelService YAML becomes")] = None,
) -> None:
    """Print the install bundle (CRD, RBAC, operator, scheduler profile) as YAML for kubectl apply."""
    _need_extra()
    import yaml
    from pydantic import ValidationError

    from kvmesh.k8s.install import InstallValues, install_manifests, to_yaml

    try:
        data = yaml.safe_load(values.read_text()) or {} if values else {}
        data |= {k: v for k, v in (("namespace", namespace), ("image", image)) if v is not None}
        v = InstallValues.model_validate(data)
        if model_service is None:
            typer.echo(to_yaml(install_manifests(v)), nl=False)
            return
        from kvmesh.k8s.api import ModelService
        from kvmesh.k8s.objects import Images, model_service_objects

        ms = ModelService.from_object(yaml.safe_load(model_service.read_text()))
        typer.echo(to_yaml(model_service_objects(ms, Images(v.image, v.vllm_image))), nl=False)
    except (OSError, yaml.YAMLError, KeyError) as e:
        fail(f"cannot read the input: {e}")
    except ValidationError as e:
        fail(str(e).replace("\n", " "))


def operator(
    image: Annotated[str | None, typer.Option(help="kvmesh image for gateway, cache nodes, sim engines")] = None,
    vllm_image: Annotated[str | None, typer.Option(help="Default engine image")] = None,
    namespace: Annotated[str | None, typer.Option(help="Watch one namespace (default: all)")] = None,
    group_timeout_s: Annotated[float, typer.Option(help="Group placement deadline")] = 300.0,
    verbose: bool = False,
) -> None:
    """Run the ModelService operator (in-cluster service account, else ~/.kube/config) until Ctrl-C."""
    _need_extra()
    from kvmesh.k8s.objects import Images
    from kvmesh.k8s.operator import Operator
    from kvmesh.k8s.reconcile import Settings

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    d = Images()
    op = Operator(Settings(Images(image or d.kvmesh, vllm_image or d.vllm), group_timeout_s), namespace)
    try:
        asyncio.run(op.run())
    except KeyboardInterrupt:
        pass


def register(app: typer.Typer) -> None:
    app.add_typer(k8s_app, name="k8s")
    app.command("operator")(operator)
