"""The backlog pipeline: results in input order, bounded memory, stop honoured, and predict/serve unchanged by it."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from tlcompile.errors import TlcompileError
from tlcompile.runtime.bundle import load_bundle
from tlcompile.runtime.pipeline import IN_FLIGHT_PER_WORKER, MAX_WORKERS, check_workers, default_workers, ordered
from tlcompile.runtime.predict import predict_paths
from tlcompile.runtime.serve import serve


def test_ordered_keeps_input_order_and_bounds_what_is_in_flight():
    started: list[int] = []
    lock = threading.Lock()
    consumed = 0
    peak = 0

    def work(i: int) -> int:
        with lock:
            started.append(i)
        time.sleep(0.002 * ((i * 7) % 5))  # later items often finish first
        return i * i

    out = []
    for item, value in ordered(work, range(40), 3):
        with lock:
            peak = max(peak, len(started) - consumed)
        consumed += 1
        out.append((item, value))
    assert out == [(i, i * i) for i in range(40)]
    assert peak <= IN_FLIGHT_PER_WORKER * 3


def test_ordered_with_one_worker_runs_in_the_calling_thread():
    threads = [t for _, t in ordered(lambda _: threading.current_thread(), range(3), 1)]
    assert threads == [threading.current_thread()] * 3


def test_ordered_stops_taking_items_once_stop_is_set_and_finishes_those_started():
    stop = threading.Event()
    taken: list[int] = []

    def source():
        for i in range(100):
            taken.append(i)
            yield i

    seen = []
    for item, _ in ordered(lambda i: i, source(), 2, stop=stop):
        seen.append(item)
        if item == 3:
            stop.set()
    assert seen == list(range(len(seen))) and len(seen) <= 4 + IN_FLIGHT_PER_WORKER * 2
    assert len(taken) == len(seen)  # nothing was taken and then dropped


def test_workers_are_checked_with_one_line():
    assert 1 <= default_workers() <= 4
    assert check_workers(None) == default_workers() and check_workers(3) == 3
    for bad in (0, -1, MAX_WORKERS + 1, 2.5, True):
        with pytest.raises(TlcompileError, match=r"--workers .* is out of range; valid: a whole number"):
            check_workers(bad)


def test_predict_paths_gives_the_same_results_with_workers(tiny_build, tmp_path, fundus_images, corrupt_images):
    folder = tmp_path / "camera"
    paths = sorted([*fundus_images(folder, 9), *corrupt_images(folder)])
    bundle = load_bundle(tiny_build.bundle)
    session = bundle.open_session()

    def strip(results):
        return [{k: v for k, v in r.to_dict().items() if k != "latency_ms"} for r in results]

    one = strip(predict_paths(bundle, session, paths, workers=1))
    assert [r["file"] for r in one] == [str(p) for p in paths]
    assert sum(r["error"] is not None for r in one) == 2
    for workers in (2, 3):
        assert strip(predict_paths(bundle, session, paths, workers=workers)) == one


def _decisions(out: Path) -> dict[str, tuple]:
    decided = {}
    for path in [*out.glob("*.json"), *(out / "errors").glob("*.json")]:
        r = json.loads(path.read_text())
        decided[r["file"]] = (path.relative_to(out).as_posix(), r["status"], r.get("referral"), r.get("sha256"))
    return decided


def test_serve_with_workers_writes_the_same_records_once(
    tiny_build, tmp_path, fundus_images, corrupt_images, quick_retries
):
    watch = tmp_path / "camera"
    fundus_images(watch, 12)
    corrupt_images(watch)
    logs: dict[int, list[str]] = {1: [], 2: []}
    one = serve(tiny_build.bundle, watch, tmp_path / "one", once=True, settle=0, workers=1, log=logs[1].append)
    two = serve(tiny_build.bundle, watch, tmp_path / "two", once=True, settle=0, workers=2, log=logs[2].append)
    assert (two.results, two.errors) == (one.results, one.errors) == (12, 2)
    assert _decisions(tmp_path / "two") == _decisions(tmp_path / "one")
    # Records are written (and logged) in the same order as with one worker: oldest first, retries after.
    order = {w: [line.split(" -> ")[0].split(":")[0] for line in log[2:]] for w, log in logs.items()}
    assert order[2] == order[1] and len(order[2]) >= 14
    again = serve(tiny_build.bundle, watch, tmp_path / "two", once=True, settle=0, workers=2, log=lambda _: None)
    assert (again.results, again.errors, again.already_done) == (0, 0, 14)


def test_serve_refuses_bad_workers_before_touching_anything(tiny_build, tmp_path):
    watch = tmp_path / "camera"
    watch.mkdir()
    with pytest.raises(TlcompileError, match=r"--workers 0 is out of range"):
        serve(tiny_build.bundle, watch, tmp_path / "out", once=True, workers=0)
    assert not (tmp_path / "out").exists()


def test_with_several_workers_the_runtime_threads_sleep_between_runs(tiny_build, monkeypatch):
    """ORT's pool threads spin after a run by default, holding a core that predict's workers need between two
    inferences (2 workers on 2 cores: 99 -> 136 photos/s). open_verified turns spinning off for more than one worker
    and leaves it on for one, where the other core has nothing else to do."""
    from tlcompile.runtime import inference
    from tlcompile.runtime.bundle import open_verified

    asked = []
    real_open = inference.open_session

    def recording_open(*args, **kwargs):
        asked.append(kwargs.get("busy_wait", True))
        return real_open(*args, **kwargs)

    monkeypatch.setattr("tlcompile.runtime.bundle.open_session", recording_open)
    for workers in (1, 2, 4):
        open_verified(tiny_build.bundle, workers=workers)
    assert asked == [True, False, False]

    key = "session.intra_op.allow_spinning"
    model = next(tiny_build.bundle.glob("model/*.onnx"))
    quiet = inference.open_session(model, "onnxruntime", threads=2, busy_wait=False)
    assert quiet._session.get_session_options().get_session_config_entry(key) == "0"
    default = inference.open_session(model, "onnxruntime", threads=2)
    with pytest.raises(Exception, match=key):  # not set: ORT's default, spinning
        default._session.get_session_options().get_session_config_entry(key)
    # OpenVINO takes the option and ignores it: its threads do not hold a core between requests
    inference.open_session(model.with_suffix(".xml"), "openvino", threads=2, busy_wait=False).close()


def test_the_model_gets_the_cores_the_workers_leave_unless_it_explains(
    tiny_build, monkeypatch, tmp_path, fundus_images
):
    """On a backlog the workers keep their cores busy; a cheap model's thread pool spread over them only adds wake-ups
    (2 workers on 2 cores: 20.6 -> 18.9 ms of CPU and 88 -> 97 photos/s with one model thread instead of two); a heavy
    model keeps every core. Heatmaps run the model on hundreds of masked copies, so --explain keeps every core for it;
    --threads is always obeyed; and predict of one photo uses one worker, whose model threads spin and answer sooner.
    (What is asked of the runtime: OpenVINO itself runs at most one thread per physical core.)"""
    from typer.testing import CliRunner

    from tlcompile.cli import app
    from tlcompile.runtime import inference
    from tlcompile.runtime.bundle import open_verified

    asked = []
    real_open = inference.open_session

    def recording_open(*args, **kwargs):
        asked.append((kwargs["threads"], kwargs.get("busy_wait", True)))
        return real_open(*args, **kwargs)

    monkeypatch.setattr("tlcompile.runtime.bundle.open_session", recording_open)
    monkeypatch.setenv("TLCOMPILE_NUM_THREADS", "4")
    monkeypatch.setattr("os.cpu_count", lambda: 8)  # (a value above the machine's CPUs is refused)
    # the tiny build's cbr_small does 184 M multiply-accumulates per 48 px image, above CHEAP_MODEL_MACS: the model is
    # what its backlog waits for, so it keeps every core beside the workers
    from tlcompile.runtime import pipeline

    macs = load_bundle(tiny_build.bundle).meta["artifact"]["macs"]
    assert macs > pipeline.CHEAP_MODEL_MACS
    open_verified(tiny_build.bundle, workers=2)
    assert asked == [(4, False)] and pipeline.model_threads(2, macs=None) == 4
    asked.clear()
    monkeypatch.setattr(pipeline, "CHEAP_MODEL_MACS", macs)  # as cheap as the quickstart's (16 M)
    for workers in (1, 2, 3, 4):
        open_verified(tiny_build.bundle, workers=workers)
    open_verified(tiny_build.bundle, workers=2, explain=True)
    open_verified(tiny_build.bundle, workers=4, threads=3)
    assert asked == [(4, True), (2, False), (1, False), (1, False), (4, False), (3, False)]

    photos = fundus_images(tmp_path / "camera", 2)
    for given, expected in (([photos[0]], (4, True)), (photos, (2, False))):
        asked.clear()
        result = CliRunner().invoke(app, ["predict", str(tiny_build.bundle), *map(str, given), "--workers", "2"])
        assert result.exit_code == 0, result.output
        assert asked == [expected], given
