"""Experiment tracking for the team: a build (or a sweep's variants, as child runs) logged to MLflow.

The build loop holds a :class:`Tracker` on its context and calls it at fixed points: :meth:`Tracker.start` once the
output folder is claimed (params: the resolved recipe, flattened), :meth:`Tracker.epoch` from the train stage's
``on_epoch`` (per-epoch metrics), :meth:`Tracker.stage` after each stage (its seconds), :meth:`Tracker.finish` after
the report is written (each artifact row's key metrics; report.json/md/html, manifest.json and the bundle folder as
artifacts), :meth:`Tracker.fail` when the build raises. Without ``tracking.mlflow`` the tracker does nothing.

Tracking never decides a build's fate: an MLflow failure (a server down, a store not writable) is printed once and
tracking stops for that build; the build goes on. MLflow is imported here only (``pip install
'tlcompile[tracking]'``): the clinic box's install never carries it. Nothing from the data's patients is logged:
params are the recipe, metrics are aggregates.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from tlcompile.compat import decline_vendor_telemetry
from tlcompile.errors import MissingDependencyError
from tlcompile.recipe import Recipe

_PARAM_VALUE_MAX = 500  # MLflow's limit was 250 before 2.x (6000 since): stay within every server's
_BATCH = 100  # params / metrics per log_batch call (MLflow's limit for params)
_NAME = re.compile(r"[^A-Za-z0-9_\-. /]+")


def flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    """{'train': {'lr': 0.001}} -> {'train.lr': '0.001'}; lists and None as JSON; long values cut (with '...')."""
    out: dict[str, str] = {}
    if isinstance(tree, dict) and tree:
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    text = json.dumps(tree) if not isinstance(tree, str) else tree
    out[prefix or "value"] = text if len(text) <= _PARAM_VALUE_MAX else text[: _PARAM_VALUE_MAX - 3] + "..."
    return out


def metric_name(*parts: Any) -> str:
    return "/".join(_NAME.sub("-", str(p)) for p in parts if p not in (None, ""))


class Tracker:
    """Does nothing: the build's tracker when the recipe tracks nowhere."""

    run_id: str | None = None

    def start(self, recipe: Recipe, out_dir: Path) -> None: ...

    def epoch(self, label: str, record: dict[str, Any]) -> None: ...

    def stage(self, name: str, seconds: float) -> None: ...

    def finish(self, report: dict[str, Any], out_dir: Path) -> None: ...

    def fail(self, error: BaseException) -> None: ...


def _client(uri: str) -> Any:
    decline_vendor_telemetry()  # MLflow's own usage events: the build talks to the tracking URI and nothing else
    try:
        from mlflow.tracking import MlflowClient
    except ImportError as err:
        raise MissingDependencyError(
            "recipe tracking.mlflow needs MLflow; install it with: pip install 'tlcompile[tracking]'"
        ) from err
    if uri.startswith("file:") or "://" not in uri:
        # MLflow 3 refuses a file store unless asked: a local file: store is what a laptop or a CI job needs.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    # MLflow retries a request 7 times with a doubling backoff, each try waiting up to 120 s: a server that is down
    # held a build silent for 4 minutes at its first call. A value the user set is kept.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    return MlflowClient(tracking_uri=uri)


def _unreachable(uri: str, timeout: float = 5.0) -> str | None:
    """Why an http(s) tracking server cannot be reached (no answer to a connection within ``timeout`` s), or None."""
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        return None
    if urllib.request.getproxies() and not urllib.request.proxy_bypass(parts.hostname):
        return None  # reached through a proxy, as MLflow's requests would be: a direct connection says nothing
    port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout).close()
    except OSError as err:
        return f"{parts.hostname}:{port} does not answer ({err.strerror or err})"
    return None


class _Untracked(Exception):
    """Why MLflow cannot be used at a URI (a store its client refuses, a server that does not answer)."""


def _connect(uri: str) -> Any:
    """The MlflowClient for ``uri``, or :class:`_Untracked` saying why not; a missing MLflow raises
    MissingDependencyError (it stops the build before anything is written)."""
    try:
        client = _client(uri)
    except MissingDependencyError:
        raise
    except Exception as err:  # broad on purpose: a store MLflow refuses never fails the build
        raise _Untracked(f"MLflow cannot use {uri} ({type(err).__name__}: {err})") from err
    if (why := _unreachable(uri)) is not None:
        raise _Untracked(f"the MLflow server at {uri}: {why}")
    return client


def experiment_id(client: Any, name: str) -> str:
    found = client.get_experiment_by_name(name)
    return found.experiment_id if found is not None else client.create_experiment(name)


class MlflowTracker(Tracker):
    """One MLflow run per build (a child run under ``parent_run_id`` in a sweep), through MlflowClient only (no
    global 'active run' state, so builds in one process never mix)."""

    def __init__(self, uri: str, experiment: str, *, parent_run_id: str | None = None, log: Any = print) -> None:
        self.uri, self.experiment, self.parent_run_id, self.log = uri, experiment, parent_run_id, log
        self.client = None
        self.run_id = None
        self._step: dict[str, int] = {}
        try:
            self.client = _connect(uri)
        except _Untracked as why:
            self.log(f"tracking: {why}; the build goes on untracked")

    def _guard(self, what: str, fn: Any) -> None:
        if self.client is None:
            return
        try:
            fn()
        except Exception as err:  # broad on purpose: tracking must never fail the build
            self.log(f"tracking: MLflow {what} failed ({type(err).__name__}: {err}); the build goes on untracked")
            self.client = None

    def _metrics(self, values: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [
            Metric(k, float(v), now, step)
            for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        ]
        for i in range(0, len(metrics), _BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + _BATCH])

    def start(self, recipe: Recipe, out_dir: Path) -> None:
        def go() -> None:
            from mlflow.entities import Param

            tags = {"tlcompile.out_dir": str(Path(out_dir).resolve()), "tlcompile.recipe_sha256": recipe.fingerprint()}
            if self.parent_run_id:
                tags["mlflow.parentRunId"] = self.parent_run_id
            run = self.client.create_run(experiment_id(self.client, self.experiment), run_name=recipe.name, tags=tags)
            self.run_id = run.info.run_id
            params = [Param(k, v) for k, v in flatten(recipe.to_yaml_dict()).items() if not k.startswith("tracking.")]
            for i in range(0, len(params), _BATCH):
                self.client.log_batch(self.run_id, params=params[i : i + _BATCH])
            self.log(f"tracking: MLflow run {self.run_id} in experiment '{self.experiment}' ({self.uri})")

        self._guard("start", go)

    def epoch(self, label: str, record: dict[str, Any]) -> None:
        step = int(record.get("epoch", self._step.get(label, 0) + 1))
        self._step[label] = step
        values = {metric_name("train", label, k): v for k, v in record.items() if k != "epoch"}
        self._guard("epoch metrics", lambda: self._metrics(values, step))

    def stage(self, name: str, seconds: float) -> None:
        self._guard("stage time", lambda: self._metrics({metric_name("stage_seconds", name): seconds}))

    def finish(self, report: dict[str, Any], out_dir: Path) -> None:
        def go() -> None:
            values: dict[str, float] = {}
            for row in report.get("artifacts", []):
                key = metric_name(row.get("name"), row.get("runtime"))
                for metric, value in (row.get("metrics") or {}).items():
                    if metric in ("auc", "sensitivity", "specificity", "accuracy", "ece", "brier", "kappa"):
                        values[metric_name(key, metric)] = value
                for q in ("p50", "p90"):
                    values[metric_name(key, f"latency_{q}_ms")] = (row.get("latency_ms") or {}).get(q)
                values[metric_name(key, "size_mb")] = (row.get("size_bytes") or 0) / 1e6
            self._metrics(values)
            for name in ("report.json", "report.md", "report.html", "manifest.json"):
                if (Path(out_dir) / name).is_file():
                    self.client.log_artifact(self.run_id, str(Path(out_dir) / name))
            if (Path(out_dir) / "bundle").is_dir():
                self.client.log_artifacts(self.run_id, str(Path(out_dir) / "bundle"), "bundle")
            self.client.set_terminated(self.run_id, "FINISHED")

        if self.run_id is not None:
            self._guard("finish", go)

    def fail(self, error: BaseException) -> None:
        def go() -> None:
            self.client.set_tag(self.run_id, "tlcompile.error", f"{type(error).__name__}: {error}"[:500])
            self.client.set_terminated(self.run_id, "FAILED")

        if self.run_id is not None:
            self._guard("fail", go)


def tracker_for(recipe: Recipe, *, parent_run_id: str | None = None, log: Any = print) -> Tracker:
    """The build's tracker: MLflow when the recipe names it, else one that does nothing."""
    cfg = recipe.tracking.mlflow if recipe.tracking is not None else None
    if cfg is None:
        return Tracker()
    return MlflowTracker(cfg.uri, cfg.experiment, parent_run_id=parent_run_id, log=log)


def start_parent_run(recipe: Recipe, name: str, *, log: Any = print) -> tuple[Any, str] | None:
    """A sweep's parent run (its variants are child runs); None when the recipe tracks nowhere, or when MLflow cannot
    start it (said once: the sweep goes on, each variant then tries its own run)."""
    cfg = recipe.tracking.mlflow if recipe.tracking is not None else None
    if cfg is None:
        return None
    try:
        client = _connect(cfg.uri)
        run = client.create_run(experiment_id(client, cfg.experiment), run_name=name, tags={"tlcompile.kind": "sweep"})
    except _Untracked as why:
        log(f"tracking: {why}; the sweep's parent run is untracked")
        return None
    except MissingDependencyError:
        raise
    except Exception as err:  # noqa: BLE001 - broad on purpose, as for a build's run: the server refused the run
        log(f"tracking: MLflow cannot start the sweep's run at {cfg.uri} ({type(err).__name__}: {err}); untracked")
        return None
    return client, run.info.run_id
