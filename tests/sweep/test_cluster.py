"""`tlcompile sweep --address`: joins a separately started Ray cluster (loopback included); an address where no
cluster answers is one line naming it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tlcompile.errors import ClusterError
from tlcompile.sweep import _host_port, cluster_address, connect

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_address_forms(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    assert cluster_address(None) == "10.0.0.5:6379" and cluster_address("127.0.0.1:1") == "127.0.0.1:1"
    assert cluster_address("local") is None
    monkeypatch.delenv("RAY_ADDRESS")
    assert cluster_address(None) is None and cluster_address("") is None
    assert _host_port("127.0.0.1:6379") == ("127.0.0.1", 6379)
    assert _host_port("ray://head.example:10001") == ("head.example", 10001)
    assert _host_port("[::1]:6379") == ("::1", 6379)
    assert _host_port("auto") is None


def test_no_cluster_at_the_address_is_one_line(tiny_recipe_dict, write_recipe, tmp_path):
    port = _free_port()  # nothing listens there
    with pytest.raises(ClusterError, match=f"--address 127.0.0.1:{port}: no Ray cluster answers there"):
        connect(object(), f"127.0.0.1:{port}")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    out = tmp_path / "sweep"
    proc = subprocess.run(
        [sys.executable, "-m", "tlcompile.cli", "sweep", str(write_recipe(tiny_recipe_dict)), "--grid",
         "train.epochs=1,2", "--address", f"127.0.0.1:{port}", "--out", str(out)],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0] and "Traceback" not in proc.stderr, proc.stderr
    assert not out.exists()  # nothing written


@pytest.mark.slow
def test_sweep_joins_a_separately_started_loopback_cluster(tiny_recipe_dict, write_recipe, tmp_path):
    ray_cli = Path(sys.executable).with_name("ray")
    port = _free_port()
    temp = tempfile.mkdtemp(prefix="tlray", dir="/tmp")  # Ray's socket paths must stay under 108 characters
    env = {**os.environ, "PYTHONPATH": str(REPO), "TLCOMPILE_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    log = tmp_path / "ray-head.log"
    with open(log, "w") as log_file:
        # --block: the head lives as this process group, so the finally below stops exactly this cluster (`ray stop`
        # would stop every Ray of this machine's user).
        head = subprocess.Popen(
            [str(ray_cli), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
             f"--temp-dir={temp}", "--include-dashboard=false", "--disable-usage-stats", "--block"],
            stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in log.read_text():
            assert head.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(1)
        tiny_recipe_dict["bench"]["runtimes"] = ["onnxruntime"]
        cache = tmp_path / "cache"  # both variants train from one disk store: the first writes it, the other reads it
        tiny_recipe_dict["data"].update(store="disk", cache=str(cache))
        out = tmp_path / "sweep"
        proc = subprocess.run(
            [sys.executable, "-m", "tlcompile.cli", "sweep", str(write_recipe(tiny_recipe_dict)), "--grid",
             "train.epochs=1,2", "--address", f"127.0.0.1:{port}", "--out", str(out)],
            capture_output=True, text=True, timeout=900, env=env,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        report = json.loads((out / "sweep.json").read_text())
        assert [v["ok"] for v in report["variants"]] == [True, True], report["variants"]
        for v, epochs in zip(report["variants"], (1, 2), strict=True):
            built = json.loads((out / v["name"] / "report.json").read_text())
            assert len(built["training"]["history"]) == epochs
        stores = [
            json.loads((out / v["name"] / "01_data" / "summary.json").read_text())["store"] for v in report["variants"]
        ]
        assert (
            stores[0]
            and stores[0] == stores[1]
            and [str(p) for p in cache.glob("*/store/*") if p.is_dir()] == [stores[0]]
        )
    finally:
        os.killpg(head.pid, signal.SIGINT)  # `ray start --block` stops its processes on SIGINT
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        time.sleep(2)
        try:  # anything of that group still alive (a raylet's worker that outlived it)
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
