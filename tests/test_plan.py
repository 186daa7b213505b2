"""bdh.ops.plan: which attention form the fused layer runs, measured per machine and cached."""

import pytest
import torch

from bdh.fileio import cache_root, read_json
from bdh.ops import layer, plan as plan_mod
from bdh.ops.plan import CACHE_FILE, Plan, best_of_each, candidates, counted_cost, plan_for
from bdh import BDH, BDHConfig


@pytest.fixture(autouse=True)
def _fresh_memo():
    plan_mod._memo.clear()
    yield
    plan_mod._memo.clear()


def test_states_allow_only_the_chunked_form():
    assert [str(p) for p in candidates(128, states=True)] == ["chunked/32", "chunked/64", "chunked/128"]
    assert [str(p) for p in candidates(128, states=False)] == [
        "direct/32", "direct/64", "direct/128", "chunked/32", "chunked/64"]
    assert candidates(12, states=False) == [Plan(12, 12)]


def test_counted_costs_follow_the_formulas():
    T, N, D = 512, 768, 192
    assert counted_cost(Plan(T, 128), T, N, D) == (T + 128) / 2 * (2 * N + 3 * D) + T * N
    assert counted_cost(Plan(256), T, N, D) == 3 * 256 * (N + D) + 7 * N * D * 256 / T
    # long sequences: carrying states wins; short ones: the direct form
    assert min(candidates(2048, False), key=lambda p: counted_cost(p, 2048, N, D)).block is None
    assert min(candidates(256, False), key=lambda p: counted_cost(p, 256, N, D)).block is not None


def test_small_shapes_use_the_count_and_write_nothing():
    cheapest = min(candidates(64, False), key=lambda p: counted_cost(p, 64, 16, 8))
    assert plan_for(1, 64, 2, 16, 8, False, torch.empty(0)) == cheapest
    assert not (cache_root() / CACHE_FILE).exists()


def test_calibration_times_the_cheapest_candidates_once_and_caches_them(monkeypatch):
    monkeypatch.setattr(plan_mod, "CALIBRATE_FROM", 0)
    timed = []

    def fake_measure(p, *shape):
        timed.append(str(p))
        return 0.2 if p == slowest_counted else 1.0

    monkeypatch.setattr(plan_mod, "measure", fake_measure)
    ranked = sorted(candidates(128, False), key=lambda p: counted_cost(p, 128, 16, 8))
    slowest_counted = ranked[plan_mod.TIMED - 1]  # the measurement, not the count, decides
    like = torch.empty(0)
    chosen = plan_for(2, 128, 2, 16, 8, False, like)
    assert chosen == slowest_counted and timed == [str(p) for p in ranked[:plan_mod.TIMED]]
    table = read_json(cache_root() / CACHE_FILE)
    (key, entry), = table.items()
    assert "B2 T128 nh2 N16 D8 states0" in key and entry["plan"] == str(chosen)
    plan_mod._memo.clear()  # a new process: the file answers, nothing is timed
    monkeypatch.setattr(plan_mod, "measure", lambda *a: pytest.fail("timed again"))
    assert plan_for(2, 128, 2, 16, 8, False, like) == chosen


def test_a_real_measurement_returns_seconds():
    p = Plan(32, 16)
    seconds = plan_mod.measure(p, 1, 2, 32, 16, 8, torch.device("cpu"), torch.float32, repeats=1)
    assert 0 < seconds < 5


def test_calibration_off_uses_the_count(monkeypatch):
    monkeypatch.setattr(plan_mod, "CALIBRATE_FROM", 0)
    monkeypatch.setenv("BDH_CALIBRATE", "0")
    monkeypatch.setattr(plan_mod, "measure", lambda *a: pytest.fail("timed"))
    cheapest = min(candidates(128, False), key=lambda p: counted_cost(p, 128, 16, 8))
    assert plan_for(2, 128, 2, 16, 8, False, torch.empty(0)) == cheapest


def test_training_runs_the_direct_form_and_state_passing_the_chunked_one():
    make_model = lambda **kw: BDH(BDHConfig.from_name("tiny", **kw))  # noqa: E731
    model = make_model()
    assert model.engine(64, has_state=False, wants_state=False).startswith("fused:direct/")
    assert model.engine(64, has_state=True).startswith("fused:chunked/")
    assert make_model(chunk_size=16).engine(64, wants_state=False) == "fused:chunked/16"


@pytest.mark.parametrize("times, below", [
    ({0.02: (1.0, 0.5), 0.05: (1.0, 0.75), 0.1: (1.0, 1.25), 0.2: (1.0, 2.0)}, 0.075),  # crosses halfway
    ({0.02: (1.0, 1.5), 0.05: (1.0, 2.0), 0.1: (1.0, 3.0), 0.2: (1.0, 5.0)}, 0.0),  # never pays
    ({0.02: (1.0, 0.1), 0.05: (1.0, 0.2), 0.1: (1.0, 0.3), 0.2: (1.0, 0.5)}, 0.2),  # pays at every density tried
])
def test_sparse_crossover_is_where_the_time_ratio_crosses_one(times, below, monkeypatch):
    monkeypatch.setattr(plan_mod, "measure_readout", lambda *shape, density: times[density])
    assert plan_mod._crossover(())["below"] == pytest.approx(below)


def test_sparse_below_is_zero_for_uncalibrated_shapes(monkeypatch):
    monkeypatch.setattr(plan_mod, "measure_readout", lambda *a, **k: pytest.fail("timed"))
    assert plan_mod.sparse_below(1, 64, 2, 16, 8, torch.empty(0)) == 0.0


def test_an_unwritable_cache_does_not_stop_training(monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("BDH_CACHE", str(blocker / "cache"))  # cannot be created
    monkeypatch.setattr(plan_mod, "CALIBRATE_FROM", 0)
    monkeypatch.setattr(plan_mod, "measure", lambda p, *shape: 1.0 if p.block else 2.0)
    assert plan_for(2, 128, 2, 16, 8, False, torch.empty(0)).block is not None


def test_a_corrupt_cache_file_is_measured_again_and_rewritten(monkeypatch):
    monkeypatch.setattr(plan_mod, "CALIBRATE_FROM", 0)
    monkeypatch.setattr(plan_mod, "measure", lambda p, *shape: 1.0 if p.block else 2.0)
    (cache_root() / CACHE_FILE).write_text("{not json")
    assert plan_for(2, 128, 2, 16, 8, False, torch.empty(0)).block is not None
    assert len(read_json(cache_root() / CACHE_FILE)) == 1


def off_the_cpu(monkeypatch):
    """The model as off the CPU (the fused and op-by-op layers timed per shape), tiny shapes calibrated."""
    monkeypatch.setattr("bdh.model.times_layer_forms", lambda device: True)
    monkeypatch.setattr(plan_mod, "calibrating", lambda *shape: True)


def test_off_the_cpu_both_layer_forms_are_timed_once_and_leave_no_trace(monkeypatch):
    """The timing passes draw no random numbers the caller sees, leave .grad and config.fused alone,
    and their result is cached: the engine then follows the faster."""
    off_the_cpu(monkeypatch)
    model = BDH(BDHConfig.from_name("tiny")).train()
    idx = torch.randint(0, 256, (2, 16))
    rng = torch.get_rng_state()
    out = model(idx, targets=idx, return_state=False)  # dropout 0: the pass itself draws nothing
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters()) and model.config.fused == "auto"
    table = read_json(cache_root() / CACHE_FILE)
    [entry] = [v for k, v in table.items() if k.endswith("states0 grad1 layer-form")]
    assert set(entry["seconds"]) == {"fused", "op_by_op"} and min(entry["seconds"].values()) > 0
    assert entry["fused"] == (entry["seconds"]["fused"] < entry["seconds"]["op_by_op"])
    assert model._fused_plan(2, 16, False, False) is not None or not entry["fused"]
    assert model.engine(16, False, False, batch=2).startswith("fused:") == entry["fused"]
    with torch.no_grad():  # forward alone is another shape of the question
        model(idx, return_state=False)
    assert sum(k.endswith("layer-form") for k in read_json(cache_root() / CACHE_FILE)) == 2
    out.loss.backward()


@pytest.mark.parametrize("fused_seconds, fused", [(1.0, True), (3.0, False)])
def test_off_the_cpu_the_faster_layer_form_runs(fused_seconds, fused, monkeypatch):
    off_the_cpu(monkeypatch)
    calls = []
    monkeypatch.setattr(BDH, "_time_layer_forms",
                        lambda self, *shape: calls.append(shape) or {"fused": fused_seconds, "op_by_op": 2.0})
    model = BDH(BDHConfig.from_name("tiny")).train()
    assert model.engine(16, False, False, batch=2).startswith("fused:") == fused
    assert model.engine(16, False, False, batch=2).startswith("fused:") == fused
    assert len(calls) == 1  # then cached
    c = model.config
    shape = (2, 16, c.n_head, c.neurons_per_head, c.n_embd, False)
    assert plan_mod.layer_form_seconds(*shape, True, model.encoder) == {"fused": fused_seconds, "op_by_op": 2.0}
    assert plan_mod.layer_form_seconds(*shape, False, model.encoder) is None  # forward alone: not timed
    monkeypatch.setattr(plan_mod, "calibrating", lambda *shape: False)  # too small to time: op by op
    assert not model.engine(8, False, False, batch=2).startswith("fused:") and len(calls) == 1
    assert BDH(BDHConfig.from_name("tiny", fused=True)).engine(8).startswith("fused:")  # on request


def test_off_the_cpu_a_layer_form_that_runs_out_of_memory_counts_as_slowest(monkeypatch):
    """At a batch only the fused layer fits, the op-by-op timing runs out of device memory: the
    fused layer runs, and the caller sees no error."""
    off_the_cpu(monkeypatch)
    model = BDH(BDHConfig.from_name("tiny")).train()

    layers, calls = model._layers, []

    def out_of_memory_op_by_op(*args):
        calls.append(model.config.fused)
        if model.config.fused is False:
            raise torch.cuda.OutOfMemoryError("out of memory")
        return layers(*args)

    monkeypatch.setattr(model, "_layers", out_of_memory_op_by_op)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    assert model.engine(16, False, False, batch=2).startswith("fused:")
    [entry] = [v for k, v in read_json(cache_root() / CACHE_FILE).items() if k.endswith("layer-form")]
    assert entry["fused"] is True and entry["seconds"]["fused"] > 0 and entry["seconds"]["op_by_op"] is None
    assert calls == [True, False] + [True] * 5  # the op-by-op layer is not tried again
    assert model.config.fused == "auto"


def test_best_of_each_times_the_forms_in_turns_after_one_untimed_call_each():
    order = []
    seconds = best_of_each({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, 3)
    assert order == ["a", "b"] * 4 and set(seconds) == {"a", "b"} and all(s >= 0 for s in seconds.values())


def test_best_of_raises_running_out_of_gpu_memory(monkeypatch):
    """best_of_each counts it as None; best_of (timing one plan) says so rather than returning None."""
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)

    def out_of_memory():
        raise torch.cuda.OutOfMemoryError("out of memory")

    assert best_of_each({"a": out_of_memory}, 2) == {"a": None}
    with pytest.raises(torch.cuda.OutOfMemoryError):
        plan_mod.best_of(out_of_memory, 2)


@pytest.mark.parametrize("faster", [False, True])
def test_weight_product_batching_is_timed_once_and_the_faster_kept(faster, monkeypatch):
    monkeypatch.setattr(plan_mod, "CALIBRATE_FROM", 0)
    timed = []

    def fake_measure(*shape):
        timed.extend([False, True])
        return {str(batched): 1.0 if batched == faster else 2.0 for batched in (False, True)}

    monkeypatch.setattr(plan_mod, "measure_products", fake_measure)
    like = torch.empty(0)
    assert plan_mod.batched_products(2, 64, 2, 16, 8, like) is faster and sorted(timed) == [False, True]
    [entry] = [v for k, v in read_json(cache_root() / CACHE_FILE).items() if k.endswith("weight-products")]
    assert entry["batched"] is faster and set(entry["seconds"]) == {"False", "True"}
    plan_mod._memo.clear()  # a new process: the file answers
    monkeypatch.setattr(plan_mod, "measure_products", lambda *a, **k: pytest.fail("timed again"))
    assert plan_mod.batched_products(2, 64, 2, 16, 8, like) is faster


def test_weight_product_batching_of_small_shapes_follows_the_device(monkeypatch):
    monkeypatch.setattr(plan_mod, "measure_products", lambda *a, **k: pytest.fail("timed"))
    assert plan_mod.batched_products(2, 64, 2, 16, 8, torch.empty(0)) is False
    assert plan_mod.batched_products(2, 64, 2, 16, 8, torch.empty(0, device="meta")) is True


def test_a_real_weight_product_measurement_returns_seconds_of_both_ways():
    timed = plan_mod.measure_products(2, 2, 16, 32, 8, torch.device("cpu"), torch.float32, repeats=1)
    assert set(timed) == {"False", "True"}
    for seconds in timed.values():
        assert 0 < seconds < 5


def test_the_model_passes_the_timed_batching_to_the_fused_layer(monkeypatch):
    monkeypatch.setattr(plan_mod, "calibrating", lambda *shape: True)
    monkeypatch.setattr("bdh.model.batched_products", lambda *shape: True)
    seen = []
    original = layer.FusedLayer.forward

    def forward(ctx, *args):
        seen.append(args[-1])  # batched, the last argument
        return original(ctx, *args)

    monkeypatch.setattr(layer.FusedLayer, "forward", staticmethod(forward))
    model = BDH(BDHConfig.from_name("tiny")).train()
    idx = torch.randint(0, 256, (2, 16))
    model(idx, targets=idx, return_state=False).loss.backward()
    assert seen == [True] * model.config.n_layer
