"""``tlcompile sweep``: run a grid of recipe variants as ordinary builds on Ray, then merge their reports.

Each variant is the base recipe plus ``--set``-style overrides (one value per ``--grid`` key). Every variant is
validated before anything starts; each runs as one Ray task (a local Ray by default, ``address`` for a cluster),
building into its own folder exactly as ``tlcompile build`` would. A failing variant is recorded with its error
and the others go on. The merged report has every artifact row of every variant and one Pareto front.
"""

from __future__ import annotations

import itertools
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tlcompile.errors import ClusterError, MissingDependencyError, RecipeError
from tlcompile.io import atomic_write_json, atomic_write_text
from tlcompile.recipe import load_recipe


@dataclass(frozen=True)
class Variant:
    name: str  # folder-safe, e.g. "model.arch=cbr_small__prune.ratio=0.3"
    overrides: tuple[str, ...]


def parse_grid(grid: list[str]) -> list[tuple[str, list[str]]]:
    """``["prune.ratio=0.3,0.5", "model.arch=a,b"]`` ->
    [("prune.ratio", ["0.3", "0.5"]), ("model.arch", ["a", "b"])]."""
    axes = []
    for item in grid:
        key, sep, values = item.partition("=")
        key = key.strip()
        if not sep or not key or not values.strip():
            raise RecipeError(f"--grid '{item}': expected key.path=value1,value2 (e.g. --grid prune.ratio=0.3,0.5)")
        if any(key == k for k, _ in axes):
            raise RecipeError(f"--grid '{item}': '{key}' is given twice; put all its values in one --grid")
        axes.append((key, [v.strip() for v in values.split(",") if v.strip()]))
    if not axes:
        raise RecipeError("sweep needs at least one --grid key.path=value1,value2")
    return axes


def variants_of(axes: list[tuple[str, list[str]]]) -> list[Variant]:
    out = []
    for combo in itertools.product(*[[(k, v) for v in values] for k, values in axes]):
        overrides = tuple(f"{k}={v}" for k, v in combo)
        name = "__".join(re.sub(r"[^A-Za-z0-9_.=-]+", "-", o) for o in overrides)
        out.append(Variant(name=name, overrides=overrides))
    return out


def _run_variant(
    recipe_path: str, overrides: list[str], out_dir: str, threads: int, tracking_parent: str | None = None
) -> dict[str, Any]:
    """Body of one Ray task: an ordinary build (with tracking, a child run of the sweep's MLflow run); errors come
    back as data so one failure never stops the sweep."""
    # (at most the node's CPUs: tlcompile refuses a value above them, naming a variable the user never set)
    os.environ["TLCOMPILE_NUM_THREADS"] = str(max(1, min(threads, os.cpu_count() or threads)))
    started = time.perf_counter()
    try:
        from rich.console import Console

        from tlcompile.build import build

        recipe = load_recipe(recipe_path, overrides)
        with open(os.devnull, "w") as devnull:
            result = build(recipe, Path(out_dir), console=Console(file=devnull), tracking_parent=tracking_parent)
        return {
            "ok": True,
            "out_dir": out_dir,
            "wall_s": time.perf_counter() - started,
            "rows": result.report["artifacts"],
        }
    except Exception as err:  # isolate the failure: the sweep reports it and goes on
        return {
            "ok": False,
            "out_dir": out_dir,
            "wall_s": time.perf_counter() - started,
            "error": f"{type(err).__name__}: {err}".splitlines()[0],
        }


def cluster_address(address: str | None) -> str | None:
    """The cluster a sweep joins: ``--address``, else ``RAY_ADDRESS``, else None (a local Ray of this machine's cores).
    ``local`` means a local Ray whatever ``RAY_ADDRESS`` says."""
    address = (address or os.environ.get("RAY_ADDRESS") or "").strip()
    return None if address in ("", "local") else address


def _host_port(address: str) -> tuple[str, int] | None:
    """``host:port``, ``ray://host:port`` or ``[v6]:port`` -> (host, port); None for forms Ray resolves itself
    (``auto``)."""
    match = re.fullmatch(r"(?:[a-z]+://)?\[?([^\[\]]+?)\]?:(\d{1,5})/?", address)
    return (match.group(1), int(match.group(2))) if match else None


def _unreachable(address: str, timeout_s: float = 5.0) -> str | None:
    """Why nothing answers at ``address`` (a TCP connect to its GCS port), or None when something listens.

    Asked first because Ray's own attempt to reach a cluster that is not there retries for minutes."""
    import socket

    hp = _host_port(address)
    if hp is None:
        return None if address == "auto" else "expected host:port, e.g. 127.0.0.1:6379"
    try:
        with socket.create_connection(hp, timeout=timeout_s):
            return None
    except OSError as err:
        return err.strerror or type(err).__name__


def connect(ray: Any, address: str | None) -> None:
    """Start a local Ray, or join the running cluster at ``address`` (``--address`` / ``RAY_ADDRESS``).

    Joining works as ``ray start`` started it, loopback included: ``ray start`` turns token authentication on when
    this machine has a Ray token (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``), but a driver
    given an explicit address does not, and its calls are then refused (retried until a ``ConnectionError`` naming the
    node's interface address, not the one given). So the same rule is applied here before joining; a token sent to a
    cluster without authentication is ignored. Any failure is one :class:`ClusterError` line naming the address.
    """
    address = cluster_address(address)
    quiet = {"include_dashboard": False, "logging_level": "ERROR", "log_to_driver": False}
    if address is None:
        ray.init(num_cpus=os.cpu_count(), **quiet)
        return
    hint = "start one with: ray start --head --port PORT, and pass --address HOST:PORT (or set RAY_ADDRESS)"
    why = _unreachable(address)
    if why is not None:
        raise ClusterError(f"--address {address}: no Ray cluster answers there ({why}); {hint}")
    try:  # Ray's own rule for `ray start` and auto-detected clusters (a private module: absent in other versions)
        from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available
    except ImportError:
        pass
    else:
        maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    try:
        ray.init(address=address, **quiet)
    except Exception as err:  # ConnectionError, RuntimeError, AuthenticationError...: one line, no traceback
        reason = f"{type(err).__name__}: {err}".splitlines()[0]
        if err.__cause__ is not None:
            reason += f" ({str(err.__cause__).splitlines()[0] if str(err.__cause__) else type(err.__cause__).__name__})"
        raise ClusterError(f"--address {address}: cannot join the Ray cluster there: {reason}; {hint}") from err


def run_sweep(
    recipe_path: Path,
    grid: list[str],
    *,
    out_dir: Path,
    base_overrides: list[str] | None = None,
    address: str | None = None,
    cpus_per_variant: int = 1,
    on_done=None,
) -> dict[str, Any]:
    try:
        import ray
    except ImportError as err:
        raise MissingDependencyError(
            "tlcompile sweep runs on Ray, which is not installed; install it with: pip install 'tlcompile[sweep]'"
        ) from err
    base_overrides = list(base_overrides or [])
    variants = variants_of(parse_grid(grid))
    for v in variants:  # validate every variant before anything runs
        load_recipe(recipe_path, [*base_overrides, *v.overrides])
    if out_dir.exists() and any(out_dir.iterdir()):
        raise RecipeError(f"sweep output folder '{out_dir}' is not empty; choose another --out (nothing was changed)")
    started_here = not ray.is_initialized()
    if started_here:  # before anything is written: a cluster that cannot be joined leaves no trace
        connect(ray, address)
    try:
        # a task asking for more CPUs than any node has is never scheduled: the sweep waited in silence for ever
        largest = max(
            (float(n.get("Resources", {}).get("CPU", 0)) for n in ray.nodes() if n.get("Alive", True)), default=0.0
        )
        if largest and cpus_per_variant > largest:
            raise ClusterError(
                f"--cpus-per-variant {cpus_per_variant} is more than any node of the cluster has ({largest:g} CPUs); "
                f"valid: 1 to {int(largest)}"
            )
        out_dir.mkdir(parents=True, exist_ok=True)
        from tlcompile.tracking import start_parent_run

        parent = start_parent_run(load_recipe(recipe_path, base_overrides), f"sweep {recipe_path.stem}")
        task = ray.remote(num_cpus=cpus_per_variant, max_retries=0)(_run_variant)
        pending = {
            task.remote(
                str(recipe_path.resolve()),
                [*base_overrides, *v.overrides],
                str((out_dir / v.name).resolve()),
                cpus_per_variant,
                parent[1] if parent else None,
            ): v
            for v in variants
        }
        results: dict[str, dict[str, Any]] = {}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            variant = pending.pop(done[0])
            try:
                outcome = ray.get(done[0])
            except Exception as err:  # the worker itself died (e.g. out of memory)
                outcome = {
                    "ok": False,
                    "out_dir": str(out_dir / variant.name),
                    "error": f"{type(err).__name__}: {err}".splitlines()[0],
                }
            results[variant.name] = {"overrides": list(variant.overrides), **outcome}
            if on_done:
                on_done(variant, outcome)
    finally:
        if started_here:
            ray.shutdown()
    report = write_sweep_report(out_dir, recipe_path, variants, results)
    if parent is not None:  # the variants' runs are its children; the merged report is its artifact
        client, run_id = parent
        for name in ("sweep.json", "sweep.md"):
            client.log_artifact(run_id, str(out_dir / name))
        client.set_terminated(run_id, "FINISHED" if all(r.get("ok") for r in results.values()) else "FAILED")
    return report


def write_sweep_report(
    out_dir: Path, recipe_path: Path, variants: list[Variant], results: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    from tlcompile.runtime.bench import mark_pareto

    rows = []
    for v in variants:
        outcome = results[v.name]
        for row in outcome.get("rows", []):
            rows.append({"variant": v.name, **row})
    mark_pareto(rows)
    report = {
        "recipe": str(recipe_path),
        "variants": [
            {"name": v.name, **{k: val for k, val in results[v.name].items() if k != "rows"}} for v in variants
        ],
        "rows": rows,
    }
    atomic_write_json(out_dir / "sweep.json", report)
    atomic_write_text(out_dir / "sweep.md", render_sweep_markdown(report))
    return report


def render_sweep_markdown(report: dict[str, Any]) -> str:
    from tlcompile.runtime.terminal import num

    lines = [f"# Sweep of {report['recipe']}", "", "| variant | status | wall s |", "|---|---|---|"]
    for v in report["variants"]:
        lines.append(
            f"| {v['name']} | {'ok' if v['ok'] else 'FAILED: ' + v.get('error', '')} | {num(v.get('wall_s'), '.0f')} |"
        )
    lines += [
        "",
        "| variant | artifact | runtime | exec | p50 ms | AUC | sens | spec | MB | Pareto |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        m = r.get("metrics", {})
        lines.append(
            f"| {r['variant']} | {r['name']} | {r['runtime']} | {r.get('exec_precision', '-')} | "
            f"{num(r['latency_ms'].get('p50'), '.2f')} | {num(m.get('auc'), '.3f')} | "
            f"{num(m.get('sensitivity'), '.3f')} | {num(m.get('specificity'), '.3f')} | "
            f"{num((r.get('size_bytes') or 0) / 1e6, '.2f')} | {'*' if r.get('pareto') else ''} |"
        )
    return "\n".join(lines) + "\n"
