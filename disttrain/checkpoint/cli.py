"""``disttrain ckpt``: look at, check and convert checkpoints without a training job.

    disttrain ckpt verify RUN_DIR|CKPT_DIR [--all]      # checksums, headers, tiling
    disttrain ckpt inspect CKPT_DIR [--json]            # step, layout, files, tensors
    disttrain ckpt consolidate CKPT_DIR OUT.safetensors [--optim]   # model.load_state_dict(load_file(OUT), strict=True)
    disttrain ckpt export CKPT_DIR OUT_DIR [--force]        # transformers: AutoModel*.from_pretrained(OUT_DIR)
    disttrain ckpt reshard --check --to zero2:3 CKPT_DIR

Nothing here unpickles or runs code from the checkpoint. Exit codes: 0 ok, 1 the
checkpoint fails (or the layout cannot load it), 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _pick(path: str, all_: bool = False) -> list[str]:
    from .reader import resolve

    found = resolve(path)
    if not found:
        raise SystemExit(
            f"disttrain ckpt: no committed checkpoint under {path}\n"
            "HINT: pass a run directory, its checkpoints/ directory or a step_* directory"
        )
    return found if all_ else found[:1]


def cmd_verify(ns) -> int:
    from . import CheckpointError, CheckpointReader

    bad = 0
    for path in _pick(ns.path, ns.all):
        try:
            r = CheckpointReader(path)
            r.verify_all()
            print(
                f"OK   {path}: step {r.step}, {len(r.manifest.files)} files, {r.manifest.nbytes():,} bytes, "
                f"{len(r.names)} tensors"
            )
        except CheckpointError as exc:
            bad += 1
            print(f"FAIL {_shown(path)}: {_shown(exc, keep=chr(10))}")
    return 1 if bad else 0


def _shown(text: object, keep: str = "") -> str:
    """``text`` with what is not printable escaped (``\\x1b``): a name in a checkpoint must not
    drive the terminal that prints it."""
    return "".join(c if c.isprintable() or c in keep else repr(c)[1:-1] for c in str(text))


def cmd_inspect(ns) -> int:
    from . import CheckpointError, CheckpointReader

    path = _pick(ns.path)[0]
    try:
        r = CheckpointReader(path, verify=False)
    except CheckpointError as exc:
        print(f"FAIL {_shown(path)}: {_shown(exc, keep=chr(10))}")
        return 1
    m = r.manifest
    if ns.json:
        print(
            json.dumps(
                {
                    "path": path,
                    "step": m.step,
                    "world_size": m.world_size,
                    "layout": m.layout,
                    "files": m.files,
                    "tensors": {
                        n: {"shape": t.shape, "dtype": t.dtype, "pieces": len(t.pieces)} for n, t in m.tensors.items()
                    },
                },
                indent=1,
            )
        )
        return 0
    print(f"{_shown(path)}\n  step {m.step}, saved on {m.world_size} ranks, layout {json.dumps(m.layout)}")
    print(f"  {len(m.files)} files, {m.nbytes():,} bytes:")
    for f, info in m.files.items():
        print(f"    {f:28s} rank {info['rank']:<4d} {info['size']:>14,d} B  xxh3 {_shown(info['checksum'])}")
    print(f"  {len(m.tensors)} tensors:")
    for n, t in m.tensors.items():
        print(f"    {_shown(n):60s} {str(list(t.shape)):18s} {t.dtype:9s} {len(t.pieces)} piece(s)")
    return 0


def _model_tensors(path: str, optim: bool = False) -> tuple[dict, dict, int]:
    """Every model tensor of the checkpoint, whole, under every name ``state_dict()`` has (tied names
    from the recorded aliases, as separate copies: safetensors refuses shared storage); optimizer
    state too with ``optim``. Returns (tensors, the ``model`` record, step)."""
    from . import CheckpointReader

    r = CheckpointReader(path)
    record = r.state().get("model") or {}
    out = {}
    for n in sorted(r.names):
        if n.startswith("model.") or (optim and n.startswith("optim.")):
            shape = r.shape(n)
            out[n[6:] if n.startswith("model.") else n] = r(n, shape, tuple((0, s) for s in shape), False)
    for alias, target in sorted((record.get("aliases") or {}).items()):
        if target in out and alias not in out:
            out[alias] = out[target].clone()
    r.release()
    return out, record, r.step


def cmd_consolidate(ns) -> int:
    from safetensors.torch import save_file

    from . import CheckpointError

    path = _pick(ns.path)[0]
    try:
        out, _, step = _model_tensors(path, ns.optim)
    except CheckpointError as exc:
        print(f"FAIL {_shown(path)}: {_shown(exc, keep=chr(10))}")
        return 1
    os.makedirs(os.path.dirname(os.path.abspath(ns.out)), exist_ok=True)
    tmp = f"{ns.out}.tmp-{os.getpid()}"
    save_file(out, tmp, metadata={"format": "pt", "step": str(step), "source": path})
    os.replace(tmp, ns.out)
    print(
        f"wrote {ns.out}: {len(out)} tensors from step {step} "
        "(model.load_state_dict(safetensors.torch.load_file(PATH), strict=True))"
    )
    return 0


def cmd_export(ns) -> int:
    """A folder ``from_pretrained`` loads: config.json (recorded at save time) + model.safetensors."""
    from safetensors.torch import save_file

    from . import CheckpointError

    path = _pick(ns.path)[0]
    try:
        out, record, step = _model_tensors(path)
    except CheckpointError as exc:
        print(f"FAIL {_shown(path)}: {_shown(exc, keep=chr(10))}")
        return 1
    hf = record.get("transformers")
    if not hf:
        print(
            f"FAIL {path}: the checkpoint records no transformers config (model class "
            f"{record.get('class', 'unknown')})\nHINT: export is for transformers PreTrainedModel models; "
            f"`disttrain ckpt consolidate {ns.path} OUT.safetensors` writes a state dict for any model"
        )
        return 1
    final = os.path.abspath(ns.out)
    ours = ("config.json", "model.safetensors")
    if os.path.lexists(final) and not os.path.isdir(final):
        print(f"FAIL {final} exists and is not a directory\nHINT: name a new or empty directory")
        return 1
    entries = sorted(os.listdir(final)) if os.path.isdir(final) else []
    if entries and not ns.force:
        print(
            f"FAIL {final} is not empty ({len(entries)} entries, e.g. {entries[0]!r})\n"
            "HINT: name a new or empty directory, or pass --force to write config.json and model.safetensors "
            "into it (nothing else there is touched)"
        )
        return 1
    # Written next to the destination, then moved in file by file: an existing directory keeps every
    # entry that is not one of ours, and a failed export leaves at most its own temporary directory.
    tmp = f"{final}.tmp-{os.getpid()}"
    os.makedirs(tmp)
    try:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf["config"], f, indent=2, sort_keys=True)
        save_file(out, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt", "step": str(step)})
        if os.path.isdir(final):  # empty, or --force
            for name in ours:
                os.replace(os.path.join(tmp, name), os.path.join(final, name))
            os.rmdir(tmp)
        else:
            os.rename(tmp, final)
    except BaseException:
        for name in ours:
            if os.path.exists(os.path.join(tmp, name)):
                os.unlink(os.path.join(tmp, name))
        if os.path.isdir(tmp):
            os.rmdir(tmp)
        raise
    print(
        f"wrote {final}: config.json + model.safetensors ({len(out)} tensors, step {step}); "
        f"transformers.{hf['architecture']}.from_pretrained({final!r})"
    )
    return 0


def cmd_reshard(ns) -> int:
    from . import CheckpointError, CheckpointReader
    from .reshard import check, parse_layout

    if not ns.check:
        print(
            "disttrain ckpt reshard: only --check is offered; a checkpoint reshards itself when a job with "
            "another layout or world size resumes from it",
            file=sys.stderr,
        )
        return 2
    path = _pick(ns.path)[0]
    try:
        target = parse_layout(ns.to)
        r = CheckpointReader(path, verify=False)
        missing = [
            f
            for f, i in r.manifest.files.items()
            if not os.path.isfile(os.path.join(path, f)) or os.path.getsize(os.path.join(path, f)) != i["size"]
        ]
        state = r.state() if not missing else {}
    except CheckpointError as exc:
        print(f"NO   {_shown(path)}: {_shown(exc, keep=chr(10))}")
        return 1
    ok, lines = check(r.manifest, target, state)
    if missing:
        ok, lines = False, [f"file {f} is missing or has the wrong size" for f in missing] + lines
    print(
        f"{'YES' if ok else 'NO '}  {path} (step {r.step}, {r.manifest.world_size} ranks, "
        f"{r.manifest.layout.get('strategy', '?')}) -> {target}"
    )
    for line in lines:
        print(f"  - {line}")
    return 0 if ok else 1


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="disttrain ckpt", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("verify", help="check every file's checksum and structure")
    v.add_argument("path")
    v.add_argument("--all", action="store_true", help="every checkpoint of the run, not only the newest")
    i = sub.add_parser("inspect", help="describe a checkpoint (no tensor data is read)")
    i.add_argument("path")
    i.add_argument("--json", action="store_true")
    c = sub.add_parser("consolidate", help="one safetensors file for the single-process model")
    c.add_argument("path")
    c.add_argument("out")
    c.add_argument("--optim", action="store_true", help="include optimizer state (optim.* names)")
    e = sub.add_parser("export", help="a folder transformers' from_pretrained loads (config.json + model.safetensors)")
    e.add_argument("path")
    e.add_argument("out")
    e.add_argument(
        "--force",
        action="store_true",
        help="write into a non-empty directory (replaces its config.json and model.safetensors, keeps the rest)",
    )
    r = sub.add_parser("reshard", help="will a layout load this checkpoint? (--check)")
    r.add_argument("path")
    r.add_argument("--check", action="store_true")
    r.add_argument("--to", required=True, help="STRATEGY:WORLD[,tp=N][,pp=N], e.g. zero2:3")
    ns = p.parse_args(argv)
    cmds = {
        "verify": cmd_verify,
        "inspect": cmd_inspect,
        "consolidate": cmd_consolidate,
        "export": cmd_export,
        "reshard": cmd_reshard,
    }
    return cmds[ns.cmd](ns)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
