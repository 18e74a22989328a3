"""disttrain.horovod's response cache, at 3 ranks over shm: the same job with the cache on and off
gives bit-identical results and the same errors, across changing tensor sets, process sets,
backward_passes_per_step, Adasum, a mismatch on one rank and a stall; the timeline says which
ops hit the cache and why the others missed. Plus the cache's decisions in one process."""

from __future__ import annotations

import json

import pytest
import torch

from disttrain.horovod.cache import BITS, ResponseCache
from disttrain.horovod.negotiation import Announcement, Ready
from disttrain.horovod.wire import Kind, digest, fuse_key
from tests.support.harness import spawn

W = 3
STALL_S = 3


def _job(capacity: int, tmp_path) -> list:
    env = {
        "DISTTRAIN_HVD_BACKEND": "shm",
        "DISTTRAIN_HVD_TIMEOUT": "60",
        "HOROVOD_CACHE_CAPACITY": str(capacity),
        "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": str(STALL_S),
        "HOROVOD_TIMELINE": str(tmp_path / f"timeline{capacity}.json"),
    }
    return spawn("tests.cases.hvd_cache:steps", W, timeout=150, env=env)


@pytest.mark.timeout(240)
def test_cache_on_and_off_give_identical_results_and_errors(tmp_path):
    on, off = _job(1024, tmp_path), _job(0, tmp_path)
    for r in range(W):
        assert on[r]["res"] == off[r]["res"], f"rank {r}: results differ with the cache on and off"
        assert on[r]["errors"] == off[r]["errors"]
        assert off[r]["hits"]["all"] == 0 and off[r]["cached"] == 0
        assert on[r]["hits"]["sets"] >= 20 and on[r]["hits"]["all"] > on[r]["hits"]["sets"]
        # a steady optimizer step: heads only with the cache on; its bucket announced in full with it off
        s_on, s_off = on[r]["steady"], off[r]["steady"]
        assert s_on["cycles"] >= 1 and s_on["bytes"] == s_on["cycles"] * s_on["head"], s_on
        assert s_off["bytes"] > s_off["cycles"] * s_off["head"], s_off
    res = {label: (dtype, shape, vals) for label, dtype, shape, vals in on[0]["res"]}
    total = sum(range(1, W + 1))
    # changing tensor sets: right values after a shape change (step 4) and a dtype change (step 6)
    assert res["set.a.3"] == ("torch.float32", [4], [float(k * total + W * 3) for k in range(4)])
    assert res["set.a.5"] == ("torch.float32", [5], [float(k * total + W * 5) for k in range(5)])
    assert res["set.b.7"][0] == "torch.float64" and res["set.d.7"][2] == [float(k * total + W * 7) for k in range(4)]
    assert res["set.gather.1"][1] == [sum(r + 2 for r in range(W)), 2]
    assert res["set.bcast.2"][2] == [float(W - 1 + 2)] * 3
    # process sets: the set's own "x" and the global "x" do not mix
    assert res["ps1.2"][2] == [float(0 + 2 + W - 1 + 2) / 2] * 3  # Average over the set
    assert res["global1.2"][2] == [sum(r - 2 for r in range(W)) / W] * 3
    assert "adasum.2" in res
    # an error on one rank: every rank raises, the steps before and after work
    for r in range(W):
        e = on[r]["errors"]
        assert e["err.0"] == e["err.1"] == e["err.3"] == "no error", e
        assert "Mismatched ALLREDUCE tensor shapes" in e["err.2"], e
    assert res["err.3"][2] == [float(total) / W] * 4
    assert (
        "never submitted it" in on[0]["errors"]["stall"]
        and "stall" not in on[1]["errors"]
        and f"ranks {list(range(1, W))}" in on[0]["errors"]["stall"]
    )
    assert res["after_stall"][2] == [float(sum(range(W)))] * 2


@pytest.mark.timeout(240)
def test_timeline_says_hit_or_why_missed(tmp_path):
    _job(1024, tmp_path)
    ev = json.loads((tmp_path / "timeline1024.json").read_text())["traceEvents"]
    neg = [e for e in ev if e["ph"] == "X" and e["name"].startswith("NEGOTIATE_")]
    assert any(e.get("args", {}).get("cache") == "hit" for e in neg)
    whys = {w for e in ev if e["name"] == "CYCLE_CACHE_MISS" for w in e["args"]["why"]}
    assert any(w.startswith("not cached") for w in whys), whys
    assert any(w.startswith("changed since cached") for w in whys), whys


# -- the cache's decisions, in one process ---------------------------------------------------------
def _ann(name: str, sig: str = "s", aux: int = 4) -> Announcement:
    return Announcement(digest(name), digest(sig), fuse_key(Kind.ALLREDUCE, torch.float32, 1, (1.0, 1.0)), aux)


def _ready(a: Announcement, size: int = 2) -> Ready:
    return Ready(a.name, a.fuse, [a.aux] * size, a.signature)


def _caches(capacity: int = 8) -> list[ResponseCache]:
    return [ResponseCache(capacity, 2, r, stall_warn_s=5.0, stall_fail_s=10.0) for r in range(2)]


@pytest.mark.unit
def test_a_cached_op_is_agreed_by_its_bit_and_a_change_invalidates_it():
    caches = _caches()
    for c in caches:
        c.insert([_ready(_ann("a")), _ready(_ann("b"))], [False, False])
    sa, _ = caches[0].lookup(_ann("a"))
    assert sa is not None and sa >= 0 and caches[1].lookup(_ann("a"))[0] == sa  # the same slot everywhere
    # both hit "a"; only rank 0 hits "b": "a" is ready, "b" waits
    hits = [caches[0].words_of([sa, caches[0].lookup(_ann("b"))[0]]), caches[1].words_of([sa])]
    zero = [0] * caches[0].words
    d = [c.decide(hits, [zero, zero], [False, False], 0) for c in caches]
    assert [r.name for r in d[0].ready] == [digest("a")] == [r.name for r in d[1].ready]
    # rank 1 submits "b" with another shape: it invalidates the slot, rank 0 must re-announce
    slot, why = caches[1].lookup(_ann("b", sig="other"))
    assert slot is not None and slot < 0 and why.startswith("changed")
    inv = [zero, caches[1].words_of([-1 - slot])]
    d = [c.decide([hits[0], zero], inv, [False, False], 1) for c in caches]
    assert d[0].dropped == d[1].dropped == [-1 - slot] and d[0].ready == []
    assert caches[0].lookup(_ann("b"))[0] is None  # gone everywhere: full negotiation next


@pytest.mark.unit
def test_a_full_cache_reuses_its_least_recently_used_slot_and_capacity_zero_is_off():
    c = _caches(capacity=2)[0]
    c.insert([_ready(_ann("a")), _ready(_ann("b"))], [False, False])
    sa = c.lookup(_ann("a"))[0]
    c.decide([c.words_of([sa]), c.words_of([sa])], [[0], [0]], [False, False], 0)  # "a" used: "b" is older
    evicted = c.insert([_ready(_ann("c"))], [False, False])
    assert c.lookup(_ann("b"))[0] is None and c.lookup(_ann("a"))[0] == sa and len(evicted) == 1
    off = ResponseCache(0, 2, 0, stall_warn_s=5.0, stall_fail_s=10.0)
    off.insert([_ready(_ann("a"))], [False, False])
    assert off.lookup(_ann("a")) == (None, "cache off (HOROVOD_CACHE_CAPACITY=0)") and off.words == 0
    assert BITS == 63


@pytest.mark.unit
def test_a_bit_some_ranks_never_set_stalls_then_fails():
    caches = _caches()
    for c in caches:
        c.insert([_ready(_ann("s"))], [False, False])
    s = caches[0].lookup(_ann("s"))[0]
    hits = [caches[0].words_of([s]), [0] * caches[0].words]
    zero = [[0] * caches[0].words] * 2
    assert caches[0].decide(hits, zero, [False, False], 0).stalled == []
    warned = caches[0].decide(hits, zero, [False, False], 6000)
    assert [(st.missing, round(st.waited_s)) for st in warned.stalled] == [([1], 6)]
    failed = caches[0].decide(hits, zero, [False, False], 11000)
    assert failed.failed[0].missing == [1] and failed.dropped == [s]
