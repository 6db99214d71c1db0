"""ppmoco.fast_path's CheckedFastPath (a fast path used only where it was checked against the plain one)
and disagreement (the comparison of outputs), on plain callables: no Paddle Inference here
(tests/eval/test_static_inference.py runs it on predictors)."""
import logging

import numpy as np
import paddle
import pytest

from ppmoco.fast_path import CheckedFastPath, disagreement

HINT = "it runs eagerly (Engine.execution=eager skips this check)"


class Calls:
    """Counts the calls of plain, of fast_for and of the fast callables of a CheckedFastPath on
    `(key, x)` arguments: plain gives ("plain", x), fast ("fast", x + `off`) and `compare` sees
    only the values."""

    def __init__(self, off=0, build_error=None, run_error=None):
        self.off, self.build_error, self.run_error = off, build_error, run_error
        self.plain = self.built = self.fast = 0

    def path(self):
        def plain(key, x):
            self.plain += 1
            return "plain", x

        def fast(key, x):
            self.fast += 1
            if self.run_error:
                raise self.run_error
            return "fast", x + self.off

        def fast_for(args, expected):
            assert expected == ("plain", args[1])  # plain's result for these arguments
            self.built += 1
            if self.build_error:
                raise self.build_error
            return fast

        return CheckedFastPath(plain, fast_for, lambda want, got: None if want[1] == got[1] else "x differs",
                               key=lambda key, x: key, describe=lambda key: f"batch {key}", name="static thing",
                               detail="oneDNN, float32", target="hook", fast_name="the program")


def lines(caplog, level):
    return [r.getMessage() for r in caplog.records if r.levelno == level]


def test_a_fast_path_that_agrees_serves_its_key_from_then_on_each_key_checked_once(caplog):
    # Catches: the fast result not returned after the check (plain every call), a check repeated at
    # every call, a key served by another key's check (key "b" unchecked), a second info line.
    caplog.set_level(logging.DEBUG, logger="ppmoco")
    calls = Calls()
    path = calls.path()
    assert [path(key, x) for key, x in (("a", 1), ("a", 2), ("b", 3), ("a", 4))] == \
        [("fast", 1), ("fast", 2), ("fast", 3), ("fast", 4)]
    assert (calls.plain, calls.built, calls.fast) == (2, 2, 4)  # plain and a build at each key's first call
    assert path.failed is None and not lines(caplog, logging.WARNING)
    info = lines(caplog, logging.INFO)
    assert len(info) == 1 and info[0].startswith("static thing (oneDNN, float32) checked against eager for hook, "
                                                 "batch a (")
    assert [m for m in lines(caplog, logging.DEBUG) if "checked against eager" in m][0].startswith(
        "static thing (oneDNN, float32) checked against eager for hook, batch b (")


@pytest.mark.parametrize("broken", ["disagrees", "build raises", "run raises"])
def test_a_fast_path_that_disagrees_or_raises_is_dropped_for_good_with_one_warning(broken, caplog):
    # Catches: the fast (wrong) result returned for the checked call, an exception escaping instead of
    # the fallback, the fast path retried at a later call or another key or after reset(), a warning
    # per call, a reason that does not say what went wrong.
    caplog.set_level(logging.INFO, logger="ppmoco")
    error = RuntimeError("native trace\n(PreconditionNotMet) no")
    calls = Calls(off=1 if broken == "disagrees" else 0, build_error=error if broken == "build raises" else None,
                  run_error=error if broken == "run raises" else None)
    path = calls.path()
    assert path("a", 1) == ("plain", 1)
    path.reset()
    assert [path(key, x) for key, x in (("a", 2), ("b", 3))] == [("plain", 2), ("plain", 3)]
    assert (calls.plain, calls.built, calls.fast) == (3, 1, 0 if broken == "build raises" else 1)
    why = "x differs" if broken == "disagrees" else "the program failed (RuntimeError: (PreconditionNotMet) no)"
    assert path.failed == why
    assert lines(caplog, logging.WARNING) == [f"static thing not used for hook: {why} (batch a); {HINT}"]
    assert not lines(caplog, logging.INFO)


def test_reset_forgets_the_checks_but_not_the_announcement(caplog):
    # Catches: a reset() that keeps the checked fast callables (stale weights would be used unchecked),
    # and one that logs the next check at info level again (a line per evaluation).
    caplog.set_level(logging.INFO, logger="ppmoco")
    calls = Calls()
    path = calls.path()
    path("a", 1)
    path.reset()
    assert path("a", 2) == ("fast", 2)
    assert (calls.plain, calls.built) == (2, 2)
    assert len(lines(caplog, logging.INFO)) == 1


def tensors(**outputs):
    return {name: paddle.to_tensor(np.asarray(value)) for name, value in outputs.items()}


def test_floating_outputs_agree_within_the_bound_relative_beyond_1_absolute_below():
    # Catches: an absolute bound where outputs exceed 1 (800 + 4e-3 would fail), a relative one below 1
    # (0.01 + 2e-6 would fail relative to 0.01), an output left unchecked (the second one).
    want = tensors(big=np.array([800.0, -3.0], "float32"), small=np.array([0.01], "float32"))
    assert disagreement(want, tensors(big=np.array([800.004, -3.0], "float32"), small=np.array([0.010002], "float32")),
                        1e-5) is None
    assert disagreement(want, tensors(big=np.array([800.0, -3.0], "float32"), small=np.array([0.01003], "float32")),
                        1e-5) == "small is 3e-05 off eager's (bound 1e-05)"


def test_nan_disagrees():
    # Catches the bound written as `diff > bound` (false for NaN, so a NaN output would pass).
    want = tensors(features=np.array([1.0, 2.0], "float32"))
    assert disagreement(want, tensors(features=np.array([1.0, np.nan], "float32")), 0.5) == \
        "features is nan off eager's (bound 1)"


def test_integer_outputs_must_be_equal_and_dtypes_and_shapes_must_match():
    # Catches: integers compared within the bound (3 vs 4 is within 1 x max(1, 3)), a float output
    # taken for a label, a shape or dtype change passed on (a broadcast or cast comparison).
    want = tensors(labels=np.array([1, 2, 3], "int64"))
    assert disagreement(want, tensors(labels=np.array([1, 2, 3], "int64")), 1.0) is None
    assert disagreement(want, tensors(labels=np.array([1, 2, 4], "int64")), 1.0) == \
        "labels differs from eager in 1 of 3 values"
    assert disagreement(want, tensors(labels=np.array([1.0, 2.0, 3.0], "float32")), 1.0) == \
        "labels is float32[3], eager int64[3]"
    assert disagreement(want, tensors(labels=np.array([[1, 2, 3]], "int64")), 1.0) == \
        "labels is int64[1, 3], eager int64[3]"
