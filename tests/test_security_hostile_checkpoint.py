"""Hostile checkpoints, round two: a shard whose declared size its pieces do not account for,
parse errors of every kind (deep nesting, wrong types, impossible tensors), a hostile state.json,
random mutations of a manifest, names that carry terminal escapes; and a resume that meets
planted hostile steps, falls back past them, sets them aside and finishes."""

from __future__ import annotations

import copy
import json
import os
import random
import subprocess
import sys

import pytest
import torch

from disttrain.checkpoint import CheckpointReader, checksum
from disttrain.checkpoint import cli as ckpt_cli
from disttrain.checkpoint.errors import CheckpointError, CheckpointFormatError
from disttrain.checkpoint.reader import list_checkpoints
from disttrain.checkpoint.writer import RankWrite, commit
from disttrain.parallel.strategy import Shard
from tests.support.harness import ROOT, spawn

SHARD = "rank_00000.safetensors"


def _save(ckpt_dir: str, step: int = 1, state: dict | None = None) -> str:
    os.makedirs(ckpt_dir, exist_ok=True)
    w = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    shards = [Shard("model.w", w, (6, 10), ((0, 6), (0, 10))), Shard("model.b", torch.ones(10), (10,), ((0, 10),))]
    job = RankWrite(ckpt_dir, step, 0, shards)
    job.write_live()
    return commit(ckpt_dir, step, 1, {"strategy": "t"}, [job.record({})], state or {"step": step}, keep=10)


def _manifest(path: str) -> dict:
    return json.load(open(os.path.join(path, "manifest.json")))


def _write_manifest(path: str, obj) -> None:
    data = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    with open(os.path.join(path, "manifest.json"), "wb") as f:
        f.write(data)


def _use(path: str) -> None:
    """Everything a resume does with a checkpoint: open, state, every tensor."""
    r = CheckpointReader(path)
    r.state()
    r.verify_all()
    for n in r.names:
        shape = r.shape(n)
        r(n, shape, tuple((0, s) for s in shape))


def _nested(depth: int = 100_000) -> bytes:
    return b"[" * depth + b"]" * depth


@pytest.mark.unit
def test_a_shard_declared_bigger_than_its_pieces_is_refused_from_the_manifest_alone(tmp_path):
    """The reader used to allocate whatever size the manifest declared before checksumming:
    here 4 GiB, a sparse file of that size and a matching (wrong) checksum."""
    path = _save(str(tmp_path / "c"))
    big = 4 << 30
    with open(os.path.join(path, SHARD), "r+b") as f:
        f.truncate(big)
    m = _manifest(path)
    m["files"][SHARD]["size"] = big
    _write_manifest(path, m)
    probe = (
        "import sys\n"
        "from disttrain.checkpoint import CheckpointReader\n"
        "from disttrain.checkpoint.errors import CheckpointFormatError\n"
        "try:\n"
        f"    r = CheckpointReader({path!r}); r.verify_all(); print('READ')\n"
        "except CheckpointFormatError as exc:\n"
        "    print('REFUSED', exc)\n"
        # VmHWM, not ru_maxrss: Linux keeps ru_maxrss across fork and exec (the pytest parent's size).
        "print('PEAK_KB', next(x.split()[1] for x in open('/proc/self/status') if x.startswith('VmHWM:')))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert "REFUSED" in out.stdout and f"declared as {big} bytes" in out.stdout, out.stdout + out.stderr
    peak_kb = int(out.stdout.rsplit("PEAK_KB", 1)[1])
    assert peak_kb < 1 << 20, f"peak RSS {peak_kb} KiB: the declared size was allocated"


@pytest.mark.unit
def test_parse_errors_of_every_kind_are_checkpoint_errors(tmp_path):
    base = _save(str(tmp_path / "c"))
    good = _manifest(base)
    cases = {
        "nested": _nested(),
        "pieces not a list": {
            **good,
            "tensors": {**good["tensors"], "model.b": {**good["tensors"]["model.b"], "pieces": 7}},
        },
        "shape of strings": {**good, "tensors": {"model.b": {**good["tensors"]["model.b"], "shape": ["a"]}}},
        "layout a list": {**good, "layout": [1]},
        "box not pairs": json.loads(
            json.dumps(good, separators=(",", ":")).replace('"box":[[0,10]]', '"box":[[0,10,3]]')
        ),
        # A 0-d tensor in two pieces: one nd, one flat, each holding the one element.
        "0-d in two pieces": {
            **good,
            "tensors": {
                **good["tensors"],
                "model.b": {
                    "shape": [],
                    "dtype": "float32",
                    "pieces": [
                        {"file": SHARD, "key": "model.b", "start": 4336, "stop": 4340, "box": [], "flat": False},
                        {"file": SHARD, "key": "x", "start": 4340, "stop": 4344, "box": [[0, 1]], "flat": True},
                    ],
                },
            },
        },
    }
    for what, manifest in cases.items():
        _write_manifest(base, manifest)
        with pytest.raises(CheckpointFormatError):
            _use(base)
            print("not refused:", what)


@pytest.mark.unit
def test_a_hostile_state_json_is_refused_before_use(tmp_path):
    rng = {"torch": "AAAA", "numpy": {}, "python": {}}
    for state in ({"step": 1, "rng": [rng]}, {"step": "1"}, {"step": 1, "data": [1]}, {"step": 1, "rng": {"a": 1}}):
        path = _save(str(tmp_path / f"c{len(os.listdir(tmp_path))}"), state=state)
        with pytest.raises(CheckpointFormatError, match="state.json"):
            CheckpointReader(path).state()
    # Deep nesting with a valid checksum and size: the manifest's cap allows it, the parser refuses it.
    path = _save(str(tmp_path / "nested"))
    nested = _nested()
    with open(os.path.join(path, "state.json"), "wb") as f:
        f.write(nested)
    m = _manifest(path)
    m["files"]["state.json"].update(size=len(nested), checksum=checksum.digest(nested))
    _write_manifest(path, m)
    with pytest.raises(CheckpointFormatError, match="nested too deeply"):
        CheckpointReader(path).state()
    # A state.json declared far bigger than any state: refused from the manifest, nothing read.
    m["files"]["state.json"]["size"] = 1 << 40
    _write_manifest(path, m)
    with pytest.raises(CheckpointFormatError, match="over the limit"):
        CheckpointReader(path)


@pytest.mark.unit
def test_random_mutations_of_a_manifest_raise_only_checkpoint_errors(tmp_path):
    """Replace one value anywhere in the manifest with a value of another type or size: whatever
    the reader does, it raises a CheckpointError (a loader falls back) or reads correct data."""
    path = _save(str(tmp_path / "c"))
    good = _manifest(path)
    weird = [None, True, -1, 0, 2**70, 1.5, "x", "\x1b[2J", [], [[]], {}, {"a": 1}, [0, 1], [[0, 2**40]]]

    def slots(obj, trail=()):
        items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
        for k, v in items:
            yield trail + (k,)
            yield from slots(v, trail + (k,))

    paths = list(slots(good))
    rnd = random.Random(26)
    for _ in range(400):
        m = copy.deepcopy(good)
        trail = rnd.choice(paths)
        node = m
        for k in trail[:-1]:
            node = node[k]
        node[trail[-1]] = rnd.choice(weird)
        _write_manifest(path, m)
        try:
            _use(path)
        except CheckpointError:
            pass
    _write_manifest(path, good)
    _use(path)


@pytest.mark.unit
def test_inspect_prints_names_escaped(tmp_path, capsys):
    path = _save(str(tmp_path / "c"))
    m = _manifest(path)
    m["tensors"]["model.\x1b]0;owned\x07\x1b[2J"] = m["tensors"].pop("model.b")
    _write_manifest(path, m)
    assert ckpt_cli.main(["inspect", path]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out
    assert "\\x1b]0;owned\\x07\\x1b[2J" in out


@pytest.mark.timeout(240)
def test_a_resume_falls_back_past_planted_hostile_steps_and_sets_them_aside(tmp_path):
    run = str(tmp_path / "run")
    base = ["train.steps=2", "checkpoint.every=2", "checkpoint.async_save=false", "checkpoint.fallback=true"]
    (first,) = spawn("tests.cases.ckpt_train:train", 1, args={"run_dir": run, "overrides": base}, timeout=200)
    ckpt = os.path.join(run, "checkpoints")
    good = os.path.join(ckpt, "step_000002")
    # Three newer steps, each a copy of the good one with one hostile file.
    for step, hostile in ((3, "nested"), (4, "pieces"), (5, "state")):
        d = os.path.join(ckpt, f"step_{step:06d}")
        os.mkdir(d)
        for n in os.listdir(good):
            with open(os.path.join(good, n), "rb") as src, open(os.path.join(d, n), "wb") as dst:
                dst.write(src.read())
        m = _manifest(d)
        m["step"] = step
        if hostile == "nested":
            _write_manifest(d, _nested())
            continue
        if hostile == "pieces":
            next(iter(m["tensors"].values()))["pieces"] = {"not": "a list"}
        else:
            state = json.dumps({"step": step, "rng": [{"torch": "AAAA"}]}).encode()
            with open(os.path.join(d, "state.json"), "wb") as f:
                f.write(state)
            m["files"]["state.json"].update(size=len(state), checksum=checksum.digest(state))
        _write_manifest(d, m)
    more = ["train.steps=4", "checkpoint.every=2", "checkpoint.async_save=false", "checkpoint.fallback=true"]
    (second,) = spawn("tests.cases.ckpt_train:train", 1, args={"run_dir": run, "overrides": more}, timeout=200)
    assert second["resumed_at"] == 2 and second["step"] == 4
    names = sorted(os.listdir(ckpt))
    for step in (3, 4, 5):
        assert f"step_{step:06d}.corrupt" in names, names
    assert [s for s, _ in list_checkpoints(ckpt)][:2] == [4, 2], names
    # The same run without the hostile steps reaches the same weights.
    clean = str(tmp_path / "clean")
    spawn("tests.cases.ckpt_train:train", 1, args={"run_dir": clean, "overrides": base}, timeout=200)
    (ref,) = spawn("tests.cases.ckpt_train:train", 1, args={"run_dir": clean, "overrides": more}, timeout=200)
    assert second["state"] == ref["state"] and first["step"] == 2
