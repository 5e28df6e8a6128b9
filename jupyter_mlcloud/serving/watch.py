"""Watching an endpoint's model: drift against its reference, quality from delayed labels,
and the alerts the controller raises when either crosses its threshold.

Replicas keep a window of their traffic and the outputs of recent requests (see
:mod:`..monitoring.window`); nothing is computed on the request path. Here the windows of a
version's replicas are gathered and compared with the reference (inputs) and with the
model's outputs on the reference (outputs), by :func:`..monitoring.drift.compare`.

Alerts go to the Dask event topic :data:`ALERT_TOPIC` (``ep.on_alert`` listens there; the
sidebar reads them) and into the endpoint's state (the last :data:`KEPT_ALERTS`). An alert is
raised when a feature starts drifting, or when quality crosses its threshold, not on every
check while it stays so.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..monitoring.window import WindowOptions, newest, quality
from . import control, launch
from . import host as worker_side

ALERT_TOPIC = "mlcloud-endpoint-alerts"
KEPT_ALERTS = 50


@dataclass(frozen=True)
class MonitorOptions:
    """How an endpoint is watched: each version's ``window`` of traffic (its newest ``rows``
    rows over its replicas, none older than ``seconds``); a feature drifts when its adjusted
    p-value is below ``alpha`` and its effect at least ``min_effect``; quality alerts below
    ``min_accuracy`` or above ``max_rmse`` (None: none), once ``min_labels`` rows were
    labelled; the controller checks every ``every_s`` seconds."""

    window: WindowOptions = field(default_factory=WindowOptions)
    alpha: float = 0.05
    min_effect: float = 0.1
    min_accuracy: float | None = None
    max_rmse: float | None = None
    min_labels: int = 20
    every_s: float = 10.0

    @classmethod
    def parse(cls, options: dict[str, Any] | None) -> MonitorOptions:
        """From ``serve(monitor={...})``: the window's ``rows``, ``seconds`` and
        ``predictions``, and this class's other fields; one sentence for an unknown key."""
        options = dict(options or {})
        window_keys = {"rows", "seconds", "predictions"}
        allowed = window_keys | {"alpha", "min_effect", "min_accuracy", "max_rmse",
                                 "min_labels", "every_s"}
        unknown = set(options) - allowed
        if unknown:
            raise ValueError(f"unknown monitor option(s) {', '.join(sorted(unknown))};"
                             f" allowed: {', '.join(sorted(allowed))}.")
        window = WindowOptions(**{k: options.pop(k) for k in window_keys & set(options)})
        return cls(window=window, **options)

    def as_dict(self) -> dict[str, Any]:
        """As kept in the endpoint's state."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MonitorOptions:
        return cls(**{**data, "window": WindowOptions(**data["window"])})


def _version(state: dict[str, Any], version: int | None) -> dict[str, Any]:
    if version is None:
        return control.primary(state)
    for v in control.live(state):
        if v["version"] == version:
            return v
    live = ", ".join(str(v["version"]) for v in control.live(state)) or "none"
    raise ValueError(f"version {version!r} of endpoint {state['name']!r} is not live; live"
                     f" version(s): {live}.")


def _ask(client: Any, version: dict[str, Any], fn: Any) -> list[Any]:
    """``fn(replica_id)`` on each replica of ``version`` whose worker is alive; replicas that
    do not answer, or no longer run, are left out (the controller replaces them)."""
    out = []
    alive = set(control.workers(client))
    for replica in version["replicas"]:
        if replica["worker"] not in alive:  # a call to it would wait out a connect timeout
            continue
        try:
            answer = launch.call(client, fn, replica["id"], worker=replica["worker"])
        except Exception:
            continue
        if answer is not None:
            out.append(answer)
    return out


def traffic(client: Any, state: dict[str, Any], version: dict[str, Any]
            ) -> list[dict[str, Any]]:
    """Each live replica of ``version``'s window (see :func:`.host.traffic`)."""
    return _ask(client, version, worker_side.traffic)


def follow(client: Any, state: dict[str, Any], version: dict[str, Any],
           kept: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """As :func:`traffic`, from only the rows each replica wrote since the last look:
    ``kept`` (replica id: its newest rows seen, and its cursor) is updated, and forgets the
    replicas that did not answer. A replica's whole window travelled at every check
    (megabytes a second, serialized on the worker that serves), for mostly the same rows."""
    window = MonitorOptions.from_dict(state["monitor"]).window
    out = []
    alive = set(control.workers(client))
    answered = set()
    for replica in version["replicas"]:
        if replica["worker"] not in alive:
            continue
        before = kept.get(replica["id"])
        try:
            answer = launch.call(client, worker_side.traffic, replica["id"],
                                 before["written"] if before else 0, worker=replica["worker"])
        except Exception:
            continue
        if answer is None:
            continue
        rows = {k: answer[k] for k in ("times", "inputs", "outputs")}
        if before is not None and all(before[k].shape[1:] == rows[k].shape[1:] for k in rows):
            # The same widths: the ring did not start over; its newest rows, as it holds them.
            rows = {k: np.concatenate([before[k], rows[k]])[-window.rows:] for k in rows}
        kept[replica["id"]] = {**rows, "written": answer["written"]}
        answered.add(replica["id"])
        recent = rows["times"] >= answer["now"] - window.seconds
        out.append({**answer, **{k: v[recent] for k, v in rows.items()},
                    "replica": replica["id"]})
    for gone in set(kept) - answered:
        del kept[gone]
    return out


def drift(client: Any, state: dict[str, Any], version: int | None = None) -> Any:
    """The drift of ``version``'s (default: the main one's) recent inputs and outputs from
    the reference, one row per feature (see :func:`..monitoring.drift.compare`)."""
    if not state.get("monitor"):
        raise ValueError(f"endpoint {state['name']!r} has no reference to measure drift"
                         " against; serve it with reference=...")
    return _compare(client, state, traffic(client, state, _version(state, version)))


def _compare(client: Any, state: dict[str, Any], gathered: list[dict[str, Any]]) -> Any:
    """The drift table of the replica windows ``gathered`` against the reference."""
    from ..monitoring.drift import compare

    options = MonitorOptions.from_dict(state["monitor"])
    ref = control.reference(client, state["name"])
    windows = [w for w in gathered if len(w["inputs"])]
    outputs_ref = next((w["reference_outputs"] for w in gathered
                        if w["reference_outputs"] is not None), None)
    out_width = 0 if outputs_ref is None else outputs_ref.reshape(len(outputs_ref), -1).shape[1]
    names = [*ref.names, *[f"output_{j}" for j in range(out_width)]]
    if windows:
        _, current_in, current_out = newest(
            np.concatenate([w["times"] for w in windows]),
            np.concatenate([w["inputs"] for w in windows]),
            np.concatenate([w["outputs"] for w in windows]), options.window.rows)
        current = np.hstack([current_in, current_out[:, :out_width]]) if out_width \
            else current_in
    else:
        current = np.empty((0, len(names)))
    reference = ref.values
    if outputs_ref is not None and out_width:
        reference = np.hstack([reference, outputs_ref.reshape(len(reference), -1)])
    return compare(reference, current, names, alpha=options.alpha,
                   min_effect=options.min_effect)


def version_quality(client: Any, state: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """Each live version's quality from delayed labels (see :func:`..monitoring.window.quality`)."""
    return {v["version"]: quality(_ask(client, v, worker_side.quality_parts))
            for v in control.live(state)}


def feedback(client: Any, state: dict[str, Any], request_ids: list[str], labels: list[Any]
             ) -> int:
    """Send labels to every live replica (each joins the requests it answered); how many
    requests were joined."""
    if len(request_ids) != len(labels):
        raise ValueError(f"feedback needs one label per request id: got {len(request_ids)}"
                         f" id(s) and {len(labels)} label(s).")
    joined = 0
    alive = set(control.workers(client))
    for replica in control.all_replicas(state):
        if replica["worker"] not in alive:
            continue
        try:
            joined += int(launch.call(client, worker_side.feedback, replica["id"],
                                      list(request_ids), list(labels),
                                      worker=replica["worker"]))
        except ValueError:
            raise
        except Exception:
            continue
    return joined


def check(client: Any, state: dict[str, Any], seen: dict[str, Any]) -> list[dict[str, Any]]:
    """The controller's periodic look: the new alerts of endpoint ``state`` (drift that
    started, quality that crossed its threshold), given what was ``seen`` at the last look
    (updated, with ``seen["summary"]``: the drifted features and the five that moved most,
    with their effect and PSI, and the main version's quality, for the sidebar and panel).
    Logged to :data:`ALERT_TOPIC`; the caller keeps them in the state."""
    options = MonitorOptions.from_dict(state["monitor"])
    alerts: list[dict[str, Any]] = []
    main = control.primary(state)
    now = time.time()
    base = {"endpoint": state["name"], "version": main["version"], "time": now}
    gathered = follow(client, state, main, seen.setdefault("windows", {}))  # drift, quality
    # The traffic each replica's window holds now: when no row came or aged out since the
    # last look, the drift is the same (an idle endpoint costs no statistics).
    holds = (main["version"],
             tuple((w["replica"], w["written"], len(w["times"])) for w in gathered))
    frame = seen.get("frame") if holds == seen.get("holds") else None
    if frame is None:
        try:
            frame = _compare(client, state, gathered)
        except Exception:
            frame = None
        seen["holds"], seen["frame"] = (holds, frame) if frame is not None else (None, None)
    if frame is not None:
        drifted = sorted(str(f) for f in frame.index[frame["drifted"]])
        top = frame.dropna(subset=["effect"]).sort_values("effect", ascending=False).head(5)
        seen["summary"] = {"time": now, "version": main["version"], "drifted": drifted,
                           "top": [[str(f), round(float(r["effect"]), 4),
                                    round(float(r["psi"]), 4)] for f, r in top.iterrows()]}
        new = [f for f in drifted if f not in seen.get("drifted", ())]
        seen["drifted"] = drifted
        if new:
            rows = frame.loc[new]
            alerts.append({**base, "kind": "drift", "features": new,
                           "message": "drift in " + ", ".join(
                               f"{f} (psi {rows.loc[f, 'psi']:.2f}, effect"
                               f" {rows.loc[f, 'effect']:.2f})" for f in new)})
    q = quality([w["quality"] for w in gathered])
    if "summary" in seen:
        seen["summary"]["quality"] = q
    bad = None
    if q["labelled"] >= options.min_labels:
        if options.min_accuracy is not None and q["accuracy"] is not None \
                and q["accuracy"] < options.min_accuracy:
            bad = f"accuracy {q['accuracy']:.3f} < {options.min_accuracy:g}"
        if options.max_rmse is not None and q["rmse"] is not None \
                and q["rmse"] > options.max_rmse:
            bad = f"rmse {q['rmse']:.4g} > {options.max_rmse:g}"
    if bad and not seen.get("quality"):
        alerts.append({**base, "kind": "quality", "features": [],
                       "message": f"quality of version {main['version']}: {bad} over"
                                  f" {q['labelled']} labelled row(s)", "quality": q})
    seen["quality"] = bool(bad)
    for alert in alerts:
        client.log_event(ALERT_TOPIC, alert)
    return alerts
