"""The Engine's side of evaluation: it logs any protocol's flat results and keeps `best` by the
module's monitor, without knowing protocol names. The Engine is built around stubs: no data, no step."""
import pytest

from ppmoco.engine.engine import Engine, monitored_value


class Recorder:
    """Stands in for the VisualDL writer, the finite-guard and the module."""

    def __init__(self, monitor=None):
        self.monitor, self.tags, self.saved = monitor, [], []

    def add(self, tag, value, step):
        self.tags.append((tag, value, step))

    def check(self, step, state=False):
        pass


class StubEvaluator:
    """Returns fixed results and computes no features (no embedding), like the linear protocol."""

    embedding = None

    def __init__(self, results):
        self.results = results

    def __call__(self):
        return self.results


def engine_returning(results, monitor):
    """An Engine whose evaluator returns `results` and whose saves are recorded, not written."""
    engine = Engine.__new__(Engine)  # __init__ would build data loaders and a training step
    stub = Recorder(monitor)
    engine.evaluator, engine.writer, engine.guard, engine.module = StubEvaluator(results), stub, stub, stub
    engine.best = None
    engine.save = lambda name, epoch, next_batch, step, regular=True: stub.saved.append((name, epoch))
    return engine, stub


def test_every_flat_value_becomes_the_visualdl_tag_it_always_was():
    # Catches tags built without the protocol prefix (eval/k20_top1) or with a doubled one.
    engine, stub = engine_returning({"knn": {"k20_top1": 97.1, "k20_top5": 99.8}}, monitor=None)
    assert engine.evaluate(global_step=7) == {"knn": {"k20_top1": 97.1, "k20_top5": 99.8}}
    assert stub.tags == [("eval/knn_k20_top1", 97.1, 7), ("eval/knn_k20_top5", 99.8, 7)]
    engine, stub = engine_returning({"linear": {"top1": 71.2, "top5": 90.1}}, monitor="top1")
    engine.evaluate(global_step=3)
    assert stub.tags == [("eval/linear_top1", 71.2, 3), ("eval/linear_top5", 90.1, 3)]


def test_best_is_kept_by_the_monitor_found_in_any_protocols_results():
    # Catches a `best` that is overwritten by a worse value, or never saved because the lookup
    # still expects the protocol to be named "linear".
    engine, stub = engine_returning({"probe": {"top1": 60.0}}, monitor="top1")
    engine._validate_and_keep_best(epoch=1, global_step=10)
    engine.evaluator = StubEvaluator({"probe": {"top1": 55.0}})
    engine._validate_and_keep_best(epoch=2, global_step=20)
    assert engine.best == 60.0 and stub.saved == [("best", 1)]


@pytest.mark.parametrize("results, monitor, want", [
    ({"linear": {"top1": 71.2}}, "top1", 71.2),
    ({"knn": {"k20_top1": 97.1}}, "top1", None),  # kNN names never match a classifier's monitor
    ({"linear": {"top1": 71.2}}, None, None),     # a module that monitors nothing keeps no best
])
def test_monitored_value(results, monitor, want):
    # Catches a substring match ("top1" in "k20_top1") and a lookup when nothing is monitored.
    assert monitored_value(results, monitor) == want
