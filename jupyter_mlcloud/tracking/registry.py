"""The MLflow model registry: register versions, move aliases, list and load models.

``models:/name/3`` and ``models:/name@alias`` are accepted wherever a model is; a name,
version or alias that does not exist is refused in one sentence that names what does.
Aliases, not MLflow's deprecated stages, mark what is deployed (``@champion``).
"""

from __future__ import annotations

import os
import re
import sys
import time
from typing import Any

from .. import savedmodel
from ..lazy import LazyModule
from . import store

mlflow = LazyModule("mlflow")
mlflow_exceptions = LazyModule("mlflow.exceptions")
mlflow_pytorch = LazyModule("mlflow.pytorch")
mlflow_artifacts = LazyModule("mlflow.artifacts")

URI_SCHEMES = ("models:/", "runs:/")
REGISTER_TIMEOUT_S = 300.0  # how long a run's recording may take to finish before registering
_LOGGED_MODEL_URI = re.compile(r"^models:/m-[0-9a-f]+$")  # a logged (unregistered) model
_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>[^/@]+)|@(?P<alias>[^/@]+))$")


def is_model_uri(value: Any) -> bool:
    """Whether ``value`` is an MLflow model URI (``models:/...`` or ``runs:/...``)."""
    return isinstance(value, str) and value.startswith(URI_SCHEMES)


def _known(names: list[str]) -> str:
    return ", ".join(sorted(names)) if names else "none yet"


def check_uri(uri: str, uri_store: str | None = None) -> str:
    """``uri`` if it names an existing model version; else ValueError naming what exists."""
    if uri.startswith("runs:/") or _LOGGED_MODEL_URI.match(uri):
        return uri
    match = _MODELS_URI.match(uri)
    if match is None:
        raise ValueError(f"model URI {uri!r} is not models:/NAME/VERSION or models:/NAME@ALIAS.")
    client = store.client(uri_store)
    name = match["name"]
    try:
        model = client.get_registered_model(name)
    except mlflow_exceptions.MlflowException:
        existing = [m.name for m in client.search_registered_models()]
        raise ValueError(f"no registered model {name!r} in {client.tracking_uri}; the"
                         f" registry has: {_known(existing)}.") from None
    versions = [str(v.version) for v in client.search_model_versions(f"name='{name}'")]
    if match["alias"] is not None:
        if match["alias"] not in model.aliases:
            aliases = [f"@{a} (version {v})" for a, v in model.aliases.items()]
            raise ValueError(f"model {name!r} has no alias {match['alias']!r}; its aliases"
                             f" are: {_known(aliases)}.")
    elif match["version"] not in versions:
        raise ValueError(f"model {name!r} has no version {match['version']!r}; it has"
                         f" version(s) {_known(versions)}.")
    return uri


def alias_of(uri: Any) -> tuple[str, str] | None:
    """``(name, alias)`` of a ``models:/NAME@ALIAS`` URI; None for anything else."""
    match = _MODELS_URI.match(uri) if isinstance(uri, str) else None
    if match is None or match["alias"] is None:
        return None
    return match["name"], match["alias"]


def alias_version(name: str, alias: str, uri_store: str | None = None) -> int:
    """The version number ``name@alias`` points at now."""
    return int(store.client(uri_store).get_model_version_by_alias(name, alias).version)


def reference_of(uri: str) -> Any:
    """The reference sample logged with model ``uri`` (a ``Reference``), or None."""
    import tempfile

    import numpy as np

    from ..monitoring.reference import Reference
    from .runs import REFERENCE_FILE

    check_uri(uri)
    store.tracking_uri()  # MLflow's artifact download reads the store in force
    with tempfile.TemporaryDirectory(prefix="mlcloud-reference-") as folder:
        try:
            path = mlflow_artifacts.download_artifacts(
                artifact_uri=f"{uri.rstrip('/')}/extra_files/{REFERENCE_FILE}", dst_path=folder)
        except Exception:
            return None  # logged without one
        with np.load(path) as saved:
            return Reference(saved["values"], tuple(str(n) for n in saved["names"]))


def load(uri: str) -> Any:
    """The ``torch.nn.Module`` a model URI names, on the CPU, in eval mode."""
    check_uri(uri)
    store.tracking_uri()  # MLflow's own loader reads the store in force
    model = mlflow_pytorch.load_model(uri, map_location="cpu")
    return model.eval()


def _model_uri_of(thing: Any, reference: Any = None) -> str:
    """A model URI for a run, a model URI, a module or callable, or a saved model's path
    (logged with ``reference``, a ``Reference``, when given)."""
    if reference is not None and (is_model_uri(thing) or hasattr(thing, "mlflow_run_id")):
        raise ValueError("reference= goes with a module or a saved model file; a run's"
                         " reference is what ctx.keep_reference kept, and a logged model's"
                         " is logged with it.")
    if is_model_uri(thing):
        return str(check_uri(thing))
    tracking = getattr(thing, "tracking", None)
    if hasattr(thing, "mlflow_run_id"):  # a training Run
        if tracking is None:
            raise ValueError(f"run {thing.id} was started with track=False, so MLflow holds no"
                             " model of it; pass the model itself instead.")
        recorder = tracking.recorder
        if not recorder.wait(REGISTER_TIMEOUT_S):
            raise ValueError(f"run {thing.id} is {thing.status} and its MLflow record is not"
                             " complete; wait for the run to end (run.result()) first.")
        if tracking.model_uri is None:
            raise ValueError(f"run {thing.id} logged no model to MLflow: it did not finish, or"
                             " its result held no torch.nn.Module (return the model, or a"
                             " dict with a 'model' entry).")
        return str(tracking.model_uri)
    return _log_standalone(thing, reference)


def _log_standalone(model: Any, reference: Any = None) -> str:
    """Log a module (or a saved model file) in an MLflow run of its own, with ``reference``
    (a ``Reference``) if given; its model URI."""
    from .recorder import Recorder
    from .runs import MODEL_NAME, log_model

    module = savedmodel.build(*savedmodel.read_file(os.fspath(model))) \
        if isinstance(model, (str, os.PathLike)) else model
    if "torch" not in sys.modules or not isinstance(module, sys.modules["torch"].nn.Module):
        raise ValueError(f"only a torch.nn.Module can be registered, got"
                         f" {type(module).__name__}.")
    logged: list[str] = []
    recorder = Recorder(f"register-{time.strftime('%Y%m%d-%H%M%S')}",
                        tags={"mlcloud.kind": "register"})
    recorder.then(MODEL_NAME, lambda run_id: logged.append(
        log_model(run_id, module, None, reference)))
    recorder.end("FINISHED")
    if not recorder.wait(REGISTER_TIMEOUT_S) or not logged:
        raise ValueError(f"the model could not be logged to {recorder.uri}.")
    return logged[0]


def register(run_or_model_or_path: Any, name: str, alias: str | None = None,
             reference: Any = None) -> Any:
    """Register a model version under ``name``; return MLflow's ``ModelVersion``.

    ``run_or_model_or_path``: a training ``Run`` (its logged model; waits for its record to
    be complete), a ``torch.nn.Module``, a path to a saved model, or a ``runs:/`` /
    ``models:/`` URI. ``alias`` (e.g. ``"champion"``) is moved to the new version. The
    version keeps a reference sample of inputs (a run's ``ctx.keep_reference``, or
    ``reference`` for a module or file), which serving the version watches for drift.
    """
    if not isinstance(name, str) or not name.strip() or "/" in name or "@" in name:
        raise ValueError(f"name must be a model name without '/' or '@', got {name!r}.")
    if alias is not None and (not isinstance(alias, str) or not re.fullmatch(r"\w[\w-]*", alias)
                              or re.fullmatch(r"[vV]\d+", alias) or alias == "latest"):
        raise ValueError(f"alias must be a word such as 'champion' (not 'latest' or 'v1'),"
                         f" got {alias!r}.")
    sample = None
    if reference is not None:
        from ..monitoring.reference import Reference

        sample = Reference.of(reference)
    uri = _model_uri_of(run_or_model_or_path, sample)
    store.tracking_uri()  # mlflow.register_model writes to the store in force
    version = mlflow.register_model(uri, name, await_registration_for=REGISTER_TIMEOUT_S)
    client = store.client()
    if alias is not None:
        client.set_registered_model_alias(name, alias, version.version)
    return client.get_model_version(name, version.version)


def set_alias(name: str, alias: str, version: int, uri: str | None = None) -> None:
    """Point ``name@alias`` at ``version``; ValueError naming what exists if either is unknown."""
    check_uri(f"models:/{name}/{version}", uri)
    store.client(uri).set_registered_model_alias(name, alias, str(version))


def models(uri: str | None = None) -> list[dict[str, Any]]:
    """Every registered model: its aliases and versions (newest first), each version with
    the run it came from and that run's latest metrics."""
    client = store.client(uri)
    out = []
    for found in client.search_registered_models():
        model = client.get_registered_model(found.name)  # a search result lacks the aliases
        aliases = {a: int(n) for a, n in model.aliases.items()}
        versions = []
        for v in sorted(client.search_model_versions(f"name='{model.name}'"),
                        key=lambda v: int(v.version), reverse=True):
            metrics: dict[str, float] = {}
            if v.run_id:
                try:
                    metrics = dict(client.get_run(v.run_id).data.metrics)
                except Exception:  # noqa: BLE001 - a deleted run: the version is still listed
                    metrics = {}
            versions.append({
                "version": int(v.version), "run_id": v.run_id,
                "aliases": sorted(a for a, n in aliases.items() if n == int(v.version)),
                "created": (v.creation_timestamp or 0) / 1000, "metrics": metrics})
        out.append({"name": model.name, "aliases": aliases, "versions": versions})
    return sorted(out, key=lambda m: m["name"])


def table(uri: str | None = None) -> Any:
    """``mlc.models()``: one row per registered model version (newest first within a model)
    with its aliases, source run, creation time and that run's latest metrics."""
    import pandas as pd

    rows = [{"name": m["name"], "version": v["version"], "aliases": ", ".join(v["aliases"]),
             "run_id": v["run_id"], "created": pd.Timestamp(v["created"], unit="s"),
             **v["metrics"]}
            for m in models(uri) for v in m["versions"]]
    columns = ["name", "version", "aliases", "run_id", "created"]
    return pd.DataFrame(rows, columns=list(dict.fromkeys(columns + [k for r in rows for k in r])))
