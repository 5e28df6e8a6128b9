"""Which MLflow store to use, and the clients that talk to it.

MLflow's own configuration wins: ``MLFLOW_TRACKING_URI`` or ``mlflow.set_tracking_uri``.
Without either, the Dask config key ``mlcloud.tracking.uri`` names the store, by default an
SQLite file ``mlruns.db`` in the working directory (MLflow 3 refuses the old ``./mlruns``
file store by default). That choice is then handed to MLflow itself, so that
``mlflow.pytorch.load_model("models:/...")`` in the same kernel reads the same store.
"""

from __future__ import annotations

import os
import threading
import urllib.request
from typing import Any

from ..lazy import LazyModule

mlflow = LazyModule("mlflow")
mlflow_exceptions = LazyModule("mlflow.exceptions")
tracking_utils = LazyModule("mlflow.tracking._tracking_service.utils")

DEFAULT_URI = "sqlite:///mlruns.db"
DEFAULT_EXPERIMENT = "jupyter_mlcloud"
PROBE_TIMEOUT_S = 2.0
_lock = threading.Lock()


def _absolute(uri: str) -> str:
    """A relative ``sqlite:///file`` made absolute, so a later ``chdir`` keeps the store."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/") and ":memory:" not in uri:
        return prefix + os.path.abspath(uri[len(prefix):])
    return uri


def tracking_uri() -> str:
    """The tracking URI in force (see the module docstring); sets MLflow's to it if unset."""
    import dask

    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    with _lock:
        if tracking_utils.is_tracking_uri_set():
            return str(tracking_utils.get_tracking_uri())
        uri = _absolute(str(dask.config.get("mlcloud.tracking.uri", None) or DEFAULT_URI))
        mlflow.set_tracking_uri(uri)
        return uri


def default_in(folder: str) -> None:
    """Put the default store (``mlruns.db``) in ``folder`` for this process, unless
    ``mlcloud.tracking.uri`` is configured. The Jupyter server calls it with its root
    directory, where the kernels of the notebooks there keep theirs (their working directory)."""
    import dask

    if dask.config.get("mlcloud.tracking.uri", None) is None:
        dask.config.set({"mlcloud.tracking.uri":
                         f"sqlite:///{os.path.join(os.path.abspath(folder), 'mlruns.db')}"})


def experiment_name() -> str:
    """The experiment runs are recorded in: ``MLFLOW_EXPERIMENT_NAME``, else the Dask config
    key ``mlcloud.tracking.experiment`` (default ``jupyter_mlcloud``)."""
    import dask

    return os.environ.get("MLFLOW_EXPERIMENT_NAME") or str(
        dask.config.get("mlcloud.tracking.experiment", DEFAULT_EXPERIMENT))


def client(uri: str | None = None) -> Any:
    """An ``MlflowClient`` for ``uri`` (default: :func:`tracking_uri`)."""
    uri = uri or tracking_uri()
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def open_client() -> tuple[str, Any]:
    """The store in force (:func:`tracking_uri`) and an ``MlflowClient`` on it;
    ConnectionError if it is a server that does not answer (see :func:`reachable`)."""
    uri = tracking_uri()
    if not reachable(uri):
        raise ConnectionError(f"{uri} does not answer")
    return uri, client(uri)


def reachable(uri: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether the store answers: an HTTP server's ``/health`` within ``timeout``; local
    stores (SQLite, files) always do. MLflow's own client retries a dead server for minutes,
    so callers ask this first."""
    if not uri.startswith(("http://", "https://")):
        return True
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as reply:
            return bool(reply.status == 200)
    except OSError:
        return False


def artifact_root(uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside an SQLite store's file (MLflow's
    default is ``./mlruns`` under whatever the working directory is); None: MLflow's choice."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix) or ":memory:" in uri:
        return None
    return os.path.join(os.path.dirname(uri[len(prefix):]), "mlartifacts")


def experiment_id(mlflow_client: Any, name: str) -> str:
    """The id of experiment ``name``, created if missing (two creators may race: one wins)."""
    found = mlflow_client.get_experiment_by_name(name)
    if found is not None:
        return str(found.experiment_id)
    try:
        return str(mlflow_client.create_experiment(
            name, artifact_location=artifact_root(mlflow_client.tracking_uri)))
    except mlflow_exceptions.MlflowException:
        return str(mlflow_client.get_experiment_by_name(name).experiment_id)


def run_of_kind(run_id: str, kind: str, what: str) -> tuple[Any, Any]:
    """An ``MlflowClient`` on the store in force and its run ``run_id``, which must be tagged
    ``mlcloud.kind`` = ``kind`` (``what`` names such a run in the sentences): ValueError for
    a malformed id, LookupError for an unknown one or a run of another kind, ConnectionError
    for a server that does not answer."""
    if not (isinstance(run_id, str) and 1 <= len(run_id) <= 32
            and all(c in "0123456789abcdef" for c in run_id)):
        raise ValueError(f"{what} {run_id!r} is not an MLflow run id (up to 32 hex digits).")
    _, mlflow_client = open_client()
    try:
        run = mlflow_client.get_run(run_id)
    except Exception as e:  # noqa: BLE001 - MLflow's "not found" is a generic exception
        if getattr(e, "error_code", None) == "RESOURCE_DOES_NOT_EXIST":
            raise LookupError(f"no {what} with MLflow run id {run_id!r}.") from None
        raise
    if run.data.tags.get("mlcloud.kind") != kind:
        raise LookupError(f"MLflow run {run_id!r} is not a {what}.")
    return mlflow_client, run
