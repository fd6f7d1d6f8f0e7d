"""OpenVINOSession.run's fast path (zero-copy input, no output dict) gives exactly what the copying path gave.

The reference is the pre-change implementation, run on the same compiled model: ``request.infer({0: x})``
(copies the input into the request's tensor) and a copy of the output tensor. Torch-free: the model is built
with OpenVINO's own ops and random weights.
"""

from __future__ import annotations

import numpy as np
import pytest

ov = pytest.importorskip("openvino")

from tlcompile.runtime.inference import OpenVINOSession  # noqa: E402

SIZE = 32


@pytest.fixture(scope="module")
def ir(tmp_path_factory):
    """conv3x3 s2 -> relu -> depthwise conv -> global average pool -> linear (2 logits); batch axis dynamic."""
    import openvino.opset13 as ops

    rng = np.random.default_rng(0)
    x = ops.parameter([-1, 3, SIZE, SIZE], np.float32, name="input")
    w1 = ops.constant(rng.standard_normal((8, 3, 3, 3)).astype(np.float32))
    h = ops.relu(ops.convolution(x, w1, [2, 2], [1, 1], [1, 1], [1, 1]))
    w2 = ops.constant(rng.standard_normal((8, 1, 1, 3, 3)).astype(np.float32))
    h = ops.group_convolution(h, w2, [1, 1], [1, 1], [1, 1], [1, 1])
    h = ops.reduce_mean(h, ops.constant(np.array([2, 3], np.int64)), keep_dims=False)
    fc = ops.constant(rng.standard_normal((8, 2)).astype(np.float32))
    logits = ops.add(ops.matmul(h, fc, False, False), ops.constant(np.array([0.5, -0.25], np.float32)))
    model = ov.Model([logits], [x], "tiny")
    path = tmp_path_factory.mktemp("ir") / "tiny.xml"
    ov.save_model(model, str(path), compress_to_fp16=False)
    return path


def reference(session: OpenVINOSession, x: np.ndarray) -> np.ndarray:
    """What run() did before: copy the input in through the data dispatcher, copy the output out."""
    session._request.infer({0: x})
    return np.array(session._request.get_output_tensor(0).data, copy=True)


def inputs(n: int, batch: int = 1, seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((batch, 3, SIZE, SIZE)).astype(np.float32) for _ in range(n)]


@pytest.mark.parametrize("batch", [1, 3])
def test_run_is_identical_to_the_copying_path(ir, batch):
    session = OpenVINOSession(path=ir, threads=1, precision="f32", static_batch=batch)
    xs = inputs(6, batch)
    expected = [reference(session, x) for x in xs]
    got = [session.run(x) for x in xs]  # repeated calls, each with a different input
    for e, g in zip(expected, got, strict=True):
        assert g.dtype == e.dtype and g.shape == e.shape == (batch, 2)
        assert np.array_equal(g, e)
    assert not all(np.array_equal(got[0], g) for g in got[1:])  # the inputs really differ
    # Interleaved with the copying path on the same request: neither leaves state that changes the other.
    for x, e in zip(xs[::-1], expected[::-1], strict=True):
        assert np.array_equal(session.run(x), e)
        assert np.array_equal(reference(session, x), e)


def test_returned_logits_are_not_overwritten_by_the_next_call(ir):
    session = OpenVINOSession(path=ir, threads=1, precision="f32", static_batch=1)
    x1, x2 = inputs(2)
    e1, e2 = reference(session, x1), reference(session, x2)
    out1 = session.run(x1)
    out2 = session.run(x2)
    assert np.array_equal(out1, e1) and np.array_equal(out2, e2)
    assert not np.shares_memory(out1, out2)
    assert not np.shares_memory(out1, session._request.get_output_tensor(0).data)


def test_request_keeps_no_view_of_the_callers_buffer(ir):
    """The caller may refill (or free) its buffer after run(): the next call must see the new contents, and no
    call in between (nor the copying path) may read the old buffer."""
    session = OpenVINOSession(path=ir, threads=1, precision="f32", static_batch=1)
    x1, x2, x3 = inputs(3)
    e1, e2, e3 = (reference(session, x) for x in (x1, x2, x3))
    buf = x1.copy()
    assert np.array_equal(session.run(buf), e1)
    assert not np.shares_memory(session._request.get_input_tensor(0).data, buf)
    buf[:] = x2  # refilled in place: same address, new contents
    assert np.array_equal(session.run(buf), e2)
    buf[:] = np.nan  # garbage left in the caller's buffer must not reach a later call on other data
    assert np.array_equal(session.run(x3), e3)
    assert np.array_equal(reference(session, x3), e3)
    assert np.array_equal(buf, np.full_like(buf, np.nan), equal_nan=True)  # run() never writes the caller's input


def test_inputs_that_cannot_be_shared_take_the_copying_path(ir):
    session = OpenVINOSession(path=ir, threads=1, precision="f32", static_batch=1)
    (x,) = inputs(1)
    expected = reference(session, x)
    readonly = x.copy()
    readonly.flags.writeable = False
    strided = np.ascontiguousarray(np.repeat(x, 2, axis=3))[..., ::2]  # same values, not C-contiguous
    assert not strided.flags.c_contiguous and np.array_equal(strided, x)
    for variant in (readonly, strided, x.astype(np.float64)):
        assert np.array_equal(session.run(variant), reference(session, variant))
    assert np.array_equal(session.run(readonly), expected)
    assert np.array_equal(session.run(strided), expected)
    with pytest.raises(RuntimeError):  # a static batch-1 model refuses a batch of 2, as before
        session.run(np.concatenate([x, x]))
    assert np.array_equal(session.run(x), expected)  # and the session still works afterwards


def test_dynamic_batch_session_is_unchanged(ir):
    """Accuracy evaluation keeps the dynamic batch axis (predict_logits): batches of any size, same logits."""
    session = OpenVINOSession(path=ir, threads=1, precision="f32")
    for batch in (4, 1, 7):
        (x,) = inputs(1, batch, seed=batch)
        assert np.array_equal(session.run(x), reference(session, x))
