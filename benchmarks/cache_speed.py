"""Feature cache vs the per-step (uncached) VLM path, measured in one run on one machine.

    python benchmarks/cache_speed.py                # ETTh1, seq_len 512, pred_len 96, batch 32, custom VLM
    python benchmarks/cache_speed.py --quick        # fewer iterations / windows, for a smoke check
    python benchmarks/cache_speed.py --seq-len 96 --skip-study
    python benchmarks/full_size_vlm.py /tmp/clip-b32 && \
        python benchmarks/cache_speed.py --vlm clip --vlm-path /tmp/clip-b32 --skip-study --build-windows 256

Measures (a) seconds per training iteration and peak memory of the uncached path, (b) the same for the
cached path, (c) the one-off cost of building the cache, (d) the wall time of a 4-trial Tune study without
and with the cache (cold cache: the study pays for the build). Each of (a)-(c) runs in its own process so
peak memory (max RSS on CPU, max allocated on CUDA) is its own; (a) and (b) alternate over several rounds
and report the median iteration with its quartiles, since a shared CPU drifts by tens of percent between
minutes. Prints ratios, writes a CSV.
"""
from __future__ import annotations

import argparse
import csv
import multiprocessing as mp
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from timevlm.config import DataConfig, ExperimentConfig, ModelConfig, TrainConfig
from timevlm.data.windows import make_loader

OUT = Path(__file__).resolve().parent / "results"


def _exp(cache_dir: str, use_cache: bool, max_windows: int | None, seq_len: int, vlm: str,
         vlm_path: str | None) -> ExperimentConfig:
    return ExperimentConfig(
        model=ModelConfig(seq_len=seq_len, pred_len=96, vlm=vlm, vlm_path=vlm_path),
        data=DataConfig(dataset="ETTh1", max_windows=max_windows),
        train=TrainConfig(batch_size=32, cache_dir=cache_dir, use_feature_cache=use_cache, progress=False))


def _train_iters(args) -> dict:
    """Child process: prepare (building or reading the cache), then time `iters` optimiser steps."""
    cache_dir, use_cache, iters, max_windows, seq_len, vlm, vlm_path = args
    from timevlm.experiment import prepare
    from timevlm.training import TrainStep, configure_process, peak_memory_mb, resolve_device

    t0 = time.perf_counter()
    p = prepare(_exp(cache_dir, use_cache, max_windows, seq_len, vlm, vlm_path), progress=True)
    prep = time.perf_counter() - t0
    device = resolve_device()
    model = p.model.to(device)
    if not use_cache:
        model._encoder.adapter.to(device)
    train = TrainConfig(lr=1e-3).resolved("timevlm")
    configure_process(train, device)  # what `fit` sets up first
    step_fn = TrainStep(model, train, device)  # the trainer's step: clipping, AdamW, weight average
    loader = make_loader(p.splits["train"], 32, shuffle=True)
    feats = p.features["train"]
    times = []
    for step, (idx, x, y) in enumerate(loader):
        if step >= iters + 2:
            break
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        step_fn.update(step_fn.loss(x.to(device), feats.batch(idx) if feats is not None else None, y.to(device)))
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= 2:  # two warm-up steps
            times.append(time.perf_counter() - t)
    return {"prepare_s": prep, "times": times, "peak_mb": peak_memory_mb(device),
            "cache_build_s": p.cache_info.get("cache_build_seconds", 0.0),
            "windows": sum(len(s) for s in p.splits.values()), "device": str(device)}


def _in_child(args) -> dict:
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(_train_iters, (args,))


def _pooled(runs: list[dict]) -> dict:
    """Iteration times of several rounds pooled: median and quartiles (robust to a noisy neighbour's burst)."""
    t = np.concatenate([r["times"] for r in runs])
    q1, med, q3 = np.percentile(t, [25, 50, 75])
    return {"s_per_iter": float(med), "q1": float(q1), "q3": float(q3), "n": len(t),
            "peak_mb": max(r["peak_mb"] for r in runs), "prepare_s": float(np.median([r["prepare_s"] for r in runs]))}


def _study_wall(cache_dir: str, use_cache: bool, max_windows: int, epochs: int, storage: str,
                model: dict) -> float:
    from timevlm_platform.runner import RunOptions, run_study
    from timevlm_platform.study import parse_study

    spec = parse_study({
        "name": f"bench-{'cached' if use_cache else 'uncached'}", "datasets": ["ETTh1"], "horizons": [96],
        "fixed": {"model": model, "data": {"max_windows": max_windows}},
        "search": {"model.norm_const": {"type": "choice", "values": [0.1, 0.4, 0.7, 1.0]},
                   "model.d_fusion": {"type": "choice", "values": [64, 128, 256]}},
        "budget": {"trials": 4, "epochs": epochs}, "scheduler": {"type": "fifo"}})
    t0 = time.perf_counter()
    run_study(spec, RunOptions(tracking_uri=f"sqlite:///{storage}/mlflow.db", storage_path=f"{storage}/ray",
                               cache_dir=cache_dir, use_feature_cache=use_cache, fresh=True, verbose=0))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small numbers, for a smoke check")
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--skip-study", action="store_true")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--cache-dir", help="reuse a feature cache (default: a fresh temporary one)")
    ap.add_argument("--vlm", default="custom", help="VLM variant (the issue's configuration: custom)")
    ap.add_argument("--vlm-path", help="weights folder of a hub variant (e.g. from full_size_vlm.py)")
    ap.add_argument("--build-windows", type=int, help="windows per split to build/measure (default: all)")
    ap.add_argument("--rounds", type=int, help="alternating uncached/cached rounds, each its own process "
                    "(default 3; --quick 1)")
    args = ap.parse_args()
    iters_uncached = args.iters or (3 if args.quick else 10)
    iters_cached = args.iters or (10 if args.quick else 50)
    build_windows = args.build_windows or (256 if args.quick else None)  # None: every ETTh1 window
    study_windows, study_epochs = (64, 1) if args.quick else (1024, 2)
    OUT.mkdir(exist_ok=True)
    rows = []
    L = args.seq_len
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache_dir or f"{tmp}/cache"
        run = (build_windows, L, args.vlm, args.vlm_path)
        build = _in_child((cache, True, 1, *run))  # cold cache: builds it (if new)
        rounds: dict[bool, list[dict]] = {False: [], True: []}
        for _ in range(args.rounds or (1 if args.quick else 3)):  # interleaved, so drift hits both paths
            rounds[False].append(_in_child((cache, False, iters_uncached, *run)))
            rounds[True].append(_in_child((cache, True, iters_cached, *run)))  # warm cache: reads it
        uncached, cached = _pooled(rounds[False]), _pooled(rounds[True])
        spread = "median of {n} iterations (quartiles {q1:.3f}-{q3:.3f})"
        rows += [
            {"measure": "uncached s/iter", "value": uncached["s_per_iter"], "peak_mb": uncached["peak_mb"],
             "note": spread.format(**uncached)},
            {"measure": "cached s/iter", "value": cached["s_per_iter"], "peak_mb": cached["peak_mb"],
             "note": spread.format(**cached)},
            {"measure": "cache build s", "value": build["cache_build_s"], "peak_mb": build["peak_mb"],
             "note": f"{build['windows']} windows"},
            {"measure": "cache read (prepare) s", "value": cached["prepare_s"], "peak_mb": cached["peak_mb"]},
        ]
        ratio_iter = uncached["s_per_iter"] / cached["s_per_iter"]
        print(f"device {build['device']}; ETTh1 seq_len {L} pred_len 96 batch 32, VLM {args.vlm}")
        print(f"(a) uncached  {uncached['s_per_iter']:.4f} s/iter  peak {uncached['peak_mb']:.0f} MB  "
              f"[{spread.format(**uncached)}]")
        print(f"(b) cached    {cached['s_per_iter']:.4f} s/iter  peak {cached['peak_mb']:.0f} MB  "
              f"[{spread.format(**cached)}]")
        print(f"    ratio     {ratio_iter:.1f}x faster per iteration")
        print(f"(c) cache build {build['cache_build_s']:.1f} s for {build['windows']} windows "
              f"(= {build['cache_build_s'] / uncached['s_per_iter']:.0f} uncached iterations); "
              f"reading it back {cached['prepare_s']:.1f} s")
        rows.append({"measure": "iteration speed-up (a/b)", "value": ratio_iter})
        if not args.skip_study:
            model = {"seq_len": L, "vlm": args.vlm, **({"vlm_path": args.vlm_path} if args.vlm_path else {})}
            wall_u = _study_wall(f"{tmp}/study-cache", False, study_windows, study_epochs, f"{tmp}/u", model)
            wall_c = _study_wall(f"{tmp}/study-cache", True, study_windows, study_epochs, f"{tmp}/c", model)
            print(f"(d) 4-trial study ({study_windows} windows/split, {study_epochs} epochs): uncached "
                  f"{wall_u:.0f} s, cached (cold cache, build included) {wall_c:.0f} s -> {wall_u / wall_c:.1f}x")
            rows += [{"measure": "4-trial study uncached s", "value": wall_u},
                     {"measure": "4-trial study cached (cold) s", "value": wall_c},
                     {"measure": "study speed-up", "value": wall_u / wall_c}]
    for r in rows:
        r["seq_len"], r["vlm"] = L, args.vlm
    path = OUT / f"cache_speed_L{L}{'' if args.vlm == 'custom' else '_' + args.vlm}.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["seq_len", "vlm", "measure", "value", "peak_mb", "note"])
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
