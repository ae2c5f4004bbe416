"""The VLM feature build: windows per second, and where its time goes, in one run on one machine.

    python benchmarks/build_speed.py                               # ETTh1 seq_len 512, 1024 training windows
    python benchmarks/build_speed.py --against b0cad08             # and the library at that commit, interleaved
    python benchmarks/build_speed.py --variant int8=model.vlm_int8=true

A measurement is `timevlm.features.build_features` (what a cache miss and the study's up-front build run) over
the first `--windows` training windows, in its own process, alternating with the others over `--rounds`
rounds; the headline is windows per second (median over rounds). A second pass over one batch times the
parts: VAL images, TAL prompts, and the VLM adapter's encode (vision encoder, tokenising, text encoder). With `--check`, each
variant's features are compared with the first measurement's (cosine similarity per window), so a faster
build that changes the features says by how much. Writes `results/build_speed.csv`.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from harness import libraries, run_child, write_rows

OUT = Path(__file__).resolve().parent / "results"


def measure(spec: dict) -> dict:
    """Child process: build features for `windows` windows with the library on PYTHONPATH."""
    import numpy as np
    import torch

    import timevlm
    from timevlm.config import ExperimentConfig
    from timevlm.experiment import feature_encoder, feature_plan
    from timevlm.features import build_features

    torch.set_num_threads(spec["threads"] or torch.get_num_threads())
    exp = ExperimentConfig.from_dict(spec["experiment"])
    _, splits = feature_plan(exp)
    split = splits["train"].subset(slice(0, spec["windows"]))
    enc = feature_encoder(exp, "cpu")
    t0 = time.perf_counter()
    feats = build_features(enc, split, progress=False)
    build_s = time.perf_counter() - t0
    # the parts, on one batch
    x = split.inputs(np.arange(min(256, len(split))))
    parts: dict[str, float] = {}

    def timed(name, fn):
        t = time.perf_counter()
        out = fn()
        parts[name] = parts.get(name, 0.0) + time.perf_counter() - t
        return out

    with torch.inference_mode():
        images = timed("images", lambda: enc.images(x))
        prompts = timed("prompts", lambda: enc.prompts(x))
        tok = enc.adapter.tokenizer(prompts, truncation=True, max_length=enc.adapter.max_tokens)
        timed("encode", lambda: enc.adapter.encode(images, prompts))  # vision + tokenising + text, as built
    out_path = spec.get("save")
    if out_path:
        torch.save({"vision": feats.vision[:256], "text": feats.text[:256]}, out_path)
    return {"windows": len(split), "build_s": build_s, "parts": parts,
            "tokens": max(len(ids) for ids in tok["input_ids"]), "threads": torch.get_num_threads(),
            "library": str(Path(timevlm.__file__).parent)}


def _cosine(a_path: str, b_path: str) -> dict[str, float]:
    import torch

    a, b = torch.load(a_path), torch.load(b_path)
    out = {}
    for k in ("vision", "text"):
        cos = torch.nn.functional.cosine_similarity(a[k].flatten(1), b[k].flatten(1), dim=1)
        out[k] = float(cos.min())
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    import numpy as np

    from timevlm.overrides import lay, parse_assignments

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="ETTh1")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--windows", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--against", nargs="*", default=[], metavar="REF",
                    help="git refs: measure the library at those commits too (worktrees), interleaved")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=section.key=value[,...]",
                    help="also measure the current library with these settings (e.g. int8=model.vlm_int8=true)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--check", action="store_true", help="compare each measurement's features with the first's")
    ap.add_argument("--out", default=str(OUT / "build_speed.csv"))
    args = ap.parse_args(argv)

    base = {"model": {"seq_len": args.seq_len}, "data": {"dataset": args.dataset},
            "train": {"use_feature_cache": True, "progress": False}}
    runs: list[tuple[str, str | None, dict]] = []
    results: dict[str, list[dict]] = {}
    import tempfile

    with libraries(args.against) as libs, tempfile.TemporaryDirectory() as tmp:
        for lib, path in libs.items():
            runs.append((lib, path, base))
        for v in args.variant:
            name, _, sets = v.partition("=")
            runs.append((name, None, lay(base, parse_assignments(sets.split(",")))))
        for r in range(args.rounds):
            for name, path, exp in runs:
                spec = {"experiment": exp, "windows": args.windows, "threads": args.threads,
                        "save": f"{tmp}/{len(results.get(name, []))}-{name}.pt" if args.check else None}
                res = run_child("build_speed", "measure", spec, path)
                res["saved"] = spec["save"]
                results.setdefault(name, []).append(res)
                print(f"  round {r + 1}/{args.rounds} {name:>10}: {res['windows'] / res['build_s']:.1f} windows/s",
                      flush=True)
        first = next(iter(results))
        ref_rate = float(np.median([r["windows"] / r["build_s"] for r in results[first]]))
        rows = []
        print(f"\n{args.dataset} seq_len {args.seq_len}, {args.windows} training windows, "
              f"{results[first][0]['threads']} threads, {args.rounds} rounds")
        print(f"{'build':>10} {'windows/s':>10} {'x':>6} {'tokens':>6}  parts of one 256-window batch (s)")
        for name, rs in results.items():
            rate = float(np.median([r["windows"] / r["build_s"] for r in rs]))
            parts = {k: float(np.median([r["parts"][k] for r in rs])) for k in rs[0]["parts"]}
            row = {"build": name, "dataset": args.dataset, "seq_len": args.seq_len, "windows": rs[0]["windows"],
                   "threads": rs[0]["threads"], "windows_per_s": rate, "speedup_vs_first": rate / ref_rate,
                   "prompt_tokens": rs[0]["tokens"], **{f"{k}_s": v for k, v in parts.items()}}
            if args.check and name != first:
                row.update({f"min_cosine_{k}": v for k, v in _cosine(results[first][0]["saved"], rs[0]["saved"]).items()})
            rows.append(row)
            extra = "".join(f"  min cos {k[11:]} {v:.4f}" for k, v in row.items() if k.startswith("min_cosine"))
            print(f"{name:>10} {rate:10.1f} {rate / ref_rate:6.2f} {rs[0]['tokens']:6d}  "
                  + " ".join(f"{k} {v:.2f}" for k, v in parts.items()) + extra)
    write_rows(args.out, rows)
    return rows


if __name__ == "__main__":
    main()
