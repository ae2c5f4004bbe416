"""The cached training step against the machine's limit: FLOPs per step, the sustained matrix-multiply rate,
and the fraction of that limit the step reaches, in one run on one machine.

    python benchmarks/step_speed.py                                   # ETTh1 512->96, batch 32, our defaults
    python benchmarks/step_speed.py --against b0cad08                 # and the library at that commit, interleaved
    python benchmarks/step_speed.py --modes fp32 bf16 --set model.d_model=32
    python benchmarks/step_speed.py --device cuda --modes fp32 bf16 compile compile-graphs
    python benchmarks/step_speed.py --table7                          # the paper's Table 7 row, five datasets
    python benchmarks/step_speed.py --device cuda --share 1 2 4 8     # K trials stepping on one device at once

The step is what a cached trial repeats: forward of Time-VLM on a batch of windows and its frozen-VLM
features (the shapes the cache holds), MSE loss, backward, AdamW, and the weight average's update where the
library's defaults keep one (`train.ema_decay`). Inputs are random tensors of the real
shapes (speed does not depend on their values), so this runs without data or encoder weights.

Each (library, mode) measurement runs in its own process, and they alternate over `--rounds` rounds, so a
noisy neighbour's minute hits all of them; the figure is the median iteration over the rounds with its
quartiles. FLOPs come from `torch.utils.flop_counter` (matrix products, convolutions and attention; the
elementwise work it does not count is exactly what keeps a step from the limit). The limit is the median
rate of square matrix products of the step's typical width in the same process, threads and dtype.
Writes `results/step_speed.csv`.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

from harness import libraries, run_child, write_rows

from timevlm.overrides import parse_assignments

OUT = Path(__file__).resolve().parent / "results"
# bf16: autocast; compile: torch.compile; compile-graphs: torch.compile(mode="reduce-overhead"), which on CUDA
# replays the forward and backward as CUDA graphs (one launch instead of hundreds: the batch-32 step is launch-bound)
MODES = ("fp32", "bf16", "compile", "compile+bf16", "compile-graphs", "compile-graphs+bf16")


def matmul_rate(device: str, dtype, n: int = 1024, seconds: float = 1.0) -> float:
    """Sustained FLOP/s of [n, n] @ [n, n] products (median of ~10 timed batches)."""
    import torch

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    t0 = time.perf_counter()
    reps = 0
    while time.perf_counter() - t0 < 0.2:
        a @ b
        reps += 1
    sync()
    per = max(1, int(reps * seconds / 10 / 0.2))
    rates = []
    for _ in range(10):
        t = time.perf_counter()
        for _ in range(per):
            a @ b
        sync()
        rates.append(2 * n ** 3 * per / (time.perf_counter() - t))
    return statistics.median(rates)


def measure(spec: dict) -> dict:
    """Child process: build the model the library at PYTHONPATH defines, time `iters` steps in `mode`."""
    import torch

    import timevlm
    from timevlm.config import ModelConfig
    from timevlm.model.timevlm import build_model
    from timevlm.model.vlm.base import feature_dims

    torch.manual_seed(0)
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    device, mode = spec["device"], spec["mode"]
    cfg = ModelConfig(**spec["model"])
    model = build_model(cfg).to(device)
    model.train()
    b, n = spec["batch"], cfg.n_vars
    x = torch.randn(b, cfg.seq_len, n, device=device)
    y = torch.randn(b, cfg.pred_len, n, device=device)
    vdim, tdim = feature_dims(cfg)
    feats = {"vision": torch.randn(b, cfg.vision_tokens, vdim, device=device),
             "text": torch.randn(b, 1, tdim, device=device)}
    if "compile" in mode:
        fwd = torch.compile(model, mode="reduce-overhead" if "graphs" in mode else "default")
    else:
        fwd = model
    amp = "bf16" in mode
    dev_type = "cuda" if device == "cuda" else "cpu"
    step = _library_step(model, fwd, torch.device(device))

    def timed_step() -> None:
        with torch.autocast(dev_type, dtype=torch.bfloat16, enabled=amp):
            loss = step.loss(x, feats, y)
        step.update(loss)

    with _flop_counter() as counter:
        with torch.autocast(dev_type, dtype=torch.bfloat16, enabled=amp):
            loss = torch.nn.functional.mse_loss(model(x, feats).float(), y)
        loss.backward()
    model.zero_grad(set_to_none=True)
    flops = counter.get_total_flops()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(spec["warmup"] + (3 if "compile" in mode else 0)):
        timed_step()
    sync()
    warmup_s = time.perf_counter() - t0  # with torch.compile: the compilation (and graph capture) a trial pays
    if spec.get("barrier"):
        _wait_for_all(*spec["barrier"])
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(spec["iters"]):
        sync()
        t = time.perf_counter()
        timed_step()
        sync()
        times.append(time.perf_counter() - t)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    width = 2 ** round(math.log2(max(cfg.d_model, 64)))
    # not while others sharing the device may still be timing their steps
    rate = (float("nan") if spec.get("barrier") else
            matmul_rate(device, torch.bfloat16 if amp else torch.float32, n=max(512, 8 * width)))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"times": times, "flops": flops, "rate": rate, "peak_mb": peak, "params": trainable, "warmup_s": warmup_s,
            "threads": torch.get_num_threads(), "library": str(Path(timevlm.__file__).parent)}


def _wait_for_all(folder: str, n: int, timeout_s: float = 600.0) -> None:
    """Start timing together: `n` processes sharing a device each leave a file in `folder` after their warm-up
    and wait for the others' (so every timed step overlaps the others' timed steps)."""
    import os

    Path(folder, str(os.getpid())).touch()
    deadline = time.monotonic() + timeout_s
    while len(os.listdir(folder)) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(os.listdir(folder))} of {n} processes sharing the device got ready")
        time.sleep(0.01)


def _flop_counter():
    """torch's FlopCounterMode, also counting the CPU fused attention kernel and its backward, which torch's
    registry leaves out (it has formulas for the CUDA kernels only): without them the step's attention, the
    same score and value products the unfused path was counted for, would be work the count never saw."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten

    def forward(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query, key, value)  # shapes: FlopCounterMode passes those

    def backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
        return sdpa_backward_flop_count(grad_out, query, key, value)

    return FlopCounterMode(display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: forward,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: backward})


def _library_step(model, fwd, device):
    """The library's own training step (`timevlm.training.TrainStep`: MSE, backward, gradient clipping, its
    optimiser, the weight average where its defaults keep one), with the forward through `fwd` (the model or
    its compiled form). Libraries from before TrainStep get the step their `fit` ran, rebuilt here: AdamW with
    torch's defaults, clipping at 1.0 and the weight average if their TrainConfig has one."""
    import torch

    from timevlm import training
    from timevlm.config import TrainConfig

    cfg = TrainConfig(lr=1e-3)
    if hasattr(cfg, "resolved"):  # `auto` settings are the model's own (older commits resolved them in `fit`)
        cfg = cfg.resolved("timevlm")
    if hasattr(training, "configure_process"):  # the process setup `fit` does (allocator settings on CPU)
        training.configure_process(cfg, device)
    if hasattr(training, "TrainStep"):
        step = training.TrainStep(model, cfg, device)
        step.model = fwd
        return step

    class Rebuilt:
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        decay = getattr(cfg, "ema_decay", None)
        ema = training._weight_average(model, decay) if decay else None

        def loss(self, x, feats, y):
            return torch.nn.functional.mse_loss(fwd(x, feats).float(), y)

        def update(self, loss):
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
            self.opt.step()
            if self.ema is not None:
                self.ema.update_parameters(model)

    return Rebuilt()


def _quantiles(t: list[float]) -> tuple[float, float, float]:
    import numpy as np

    q1, med, q3 = np.percentile(t, [25, 50, 75])
    return float(q1), float(med), float(q3)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="ETTh1", help="takes n_vars and periodicity from the dataset registry")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--set", nargs="*", default=[], metavar="model.KEY=VALUE", help="model config overrides")
    ap.add_argument("--modes", nargs="*", default=["fp32"], choices=MODES)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--threads", type=int, default=0, help="torch threads per measurement (0: torch's default)")
    ap.add_argument("--against", nargs="*", default=[], metavar="REF",
                    help="git refs: measure the library at those commits too (worktrees), interleaved")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default=str(OUT / "step_speed.csv"))
    ap.add_argument("--share", type=int, nargs="*", default=[], metavar="K",
                    help="K trials on one device: K processes step at once (threads split between them on CPU); "
                         "per-process s/iter and the steps per second of all K together, for each K")
    ap.add_argument("--table7", action="store_true", help="parameters, peak memory and s/iter on ETTh1, ETTh2, "
                    "ETTm1, ETTm2 and Weather (the paper's Table 7 columns), first mode only")
    args = ap.parse_args(argv)
    if args.table7:
        return table7(args)
    if args.share:
        return share(args)

    model = _model_spec(args, args.dataset)
    base = {"model": model, "batch": args.batch, "device": args.device, "threads": args.threads,
            "iters": args.iters, "warmup": args.warmup}
    results: dict[tuple[str, str], list[dict]] = {}
    with libraries(args.against) as libs:
        for r in range(args.rounds):
            for lib, path in libs.items():
                for mode in args.modes:
                    res = run_child("step_speed", "measure", {**base, "mode": mode}, path)
                    results.setdefault((lib, mode), []).append(res)
                    print(f"  round {r + 1}/{args.rounds} {lib:>8} {mode:<7} "
                          f"{statistics.median(res['times']):.4f} s/iter", flush=True)
    rows = []
    ref = results[("now", args.modes[0])]
    ref_med = _quantiles([t for r in ref for t in r["times"]])[1]
    print(f"\n{args.dataset} seq_len {args.seq_len} -> 96, batch {args.batch}, model {model}, device {args.device}, "
          f"{ref[0]['threads']} threads, {args.rounds} rounds x {args.iters} iterations")
    print(f"{'library':>8} {'mode':<7} {'s/iter':>8} {'quartiles':>15} {'GFLOP/step':>10} {'limit GFLOP/s':>13} "
          f"{'of limit':>8} {'x vs now/' + args.modes[0]:>14} {'peak MB':>8} {'params':>10} {'warm-up s':>9}")
    for (lib, mode), runs in results.items():
        q1, med, q3 = _quantiles([t for r in runs for t in r["times"]])
        flops, rate = runs[0]["flops"], statistics.median(r["rate"] for r in runs)
        frac = flops / med / rate
        row = {"library": lib, "mode": mode, "device": args.device, "dataset": args.dataset, "seq_len": args.seq_len,
               "batch": args.batch, "model": str(model), "threads": runs[0]["threads"], "s_per_iter": med,
               "q1": q1, "q3": q3, "gflop_per_step": flops / 1e9, "limit_gflops": rate / 1e9,
               "fraction_of_limit": frac, "speedup_vs_first": ref_med / med,
               "peak_mb": max(r["peak_mb"] for r in runs), "params_trainable": runs[0]["params"],
               "warmup_s": statistics.median(r.get("warmup_s", float("nan")) for r in runs),
               "warmup_steps": args.warmup + (3 if "compile" in mode else 0)}
        rows.append(row)
        print(f"{lib:>8} {mode:<7} {med:8.4f} {q1:7.4f}-{q3:.4f} {flops / 1e9:10.2f} {rate / 1e9:13.1f} "
              f"{frac:8.1%} {ref_med / med:14.2f} {row['peak_mb']:8.0f} {runs[0]['params']:10,} {row['warmup_s']:9.1f}")
    write_rows(args.out, rows)
    return rows


def _model_spec(args, dataset: str) -> dict:
    """The measured model's config: seq_len -> 96 with the dataset's n_vars and period, then the --set overrides."""
    from timevlm.data.registry import get_dataset

    info = get_dataset(dataset)
    return {"seq_len": args.seq_len, "pred_len": 96, "n_vars": info.n_vars, "periodicity": info.periodicity,
            **parse_assignments(args.set).get("model", {})}


def share(args) -> list[dict]:
    """How many trials can share one device before they slow each other down: for each K, K processes (the
    library now, first mode) time their steps at the same moment; on CPU each gets threads = cores // K unless
    --threads says otherwise."""
    import concurrent.futures as cf
    import os
    import tempfile

    model = _model_spec(args, args.dataset)
    rows, base_rate = [], None
    for k in args.share:
        threads = args.threads or (max(1, (os.cpu_count() or 1) // k) if args.device == "cpu" else 0)
        for r in range(args.rounds):
            with tempfile.TemporaryDirectory() as barrier, cf.ThreadPoolExecutor(k) as pool:
                spec = {"model": model, "batch": args.batch, "device": args.device, "threads": threads,
                        "iters": args.iters, "warmup": args.warmup, "mode": args.modes[0], "barrier": [barrier, k]}
                runs = list(pool.map(lambda _: run_child("step_speed", "measure", spec, None), range(k)))
            per = [statistics.median(res["times"]) for res in runs]
            rate = sum(1 / t for t in per)  # steps per second of the K trials together
            base_rate = base_rate or rate
            rows.append({"device": args.device, "dataset": args.dataset, "seq_len": args.seq_len, "batch": args.batch,
                         "mode": args.modes[0], "trials": k, "round": r + 1, "threads_per_trial": runs[0]["threads"],
                         "s_per_iter_median": statistics.median(per), "s_per_iter_worst": max(per),
                         "steps_per_s_total": rate, "throughput_vs_first": rate / base_rate,
                         "peak_mb_per_trial": max(res["peak_mb"] for res in runs)})
            row = rows[-1]
            print(f"  {k} trial(s) x {row['threads_per_trial']} threads: {row['s_per_iter_median']:.4f} s/iter each "
                  f"(worst {row['s_per_iter_worst']:.4f}), {rate:.1f} steps/s together "
                  f"({rate / base_rate:.2f}x the first)", flush=True)
    write_rows(Path(args.out).with_name("share.csv"), rows)
    return rows


TABLE7_DATASETS = ("ETTh1", "ETTh2", "ETTm1", "ETTm2", "Weather")


def frozen_parameters(model: dict) -> int | None:
    """Parameters of the frozen VLM (loads its weights; None where they are not installed)."""
    from transformers.utils import logging as hf_logging

    from timevlm.config import ModelConfig
    from timevlm.model.vlm import load_vlm

    hf_logging.disable_progress_bar()
    try:
        return sum(p.numel() for p in load_vlm(ModelConfig(**model)).parameters())
    except Exception:  # noqa: BLE001 - weights missing: the column says so
        return None


def table7(args) -> list[dict]:
    from timevlm.data.registry import get_dataset

    sets = parse_assignments(args.set).get("model", {})
    frozen = frozen_parameters({"seq_len": args.seq_len, **sets})  # the same VLM for every dataset
    rows = []
    for name in TABLE7_DATASETS:
        info = get_dataset(name)
        model = _model_spec(args, name)
        runs = [run_child("step_speed", "measure", {"model": model, "batch": args.batch, "device": args.device,
                                                    "threads": args.threads, "iters": args.iters,
                                                    "warmup": args.warmup, "mode": args.modes[0]}, None)
                for _ in range(args.rounds)]
        q1, med, q3 = _quantiles([t for r in runs for t in r["times"]])
        rows.append({"dataset": name, "n_vars": info.n_vars, "seq_len": args.seq_len, "batch": args.batch,
                     "device": args.device, "mode": args.modes[0], "threads": runs[0]["threads"],
                     "params_trainable": runs[0]["params"], "params_frozen": frozen,
                     "peak_mb": max(r["peak_mb"] for r in runs), "s_per_iter": med, "q1": q1, "q3": q3})
        r = rows[-1]
        print(f"  {name:<8} {r['params_trainable']:>10,} trainable  {r['params_frozen'] or 0:>11,} frozen  "
              f"{r['peak_mb']:7.0f} MB  {med:.4f} s/iter ({q1:.4f}-{q3:.4f})", flush=True)
    write_rows(Path(args.out).with_name("table7.csv"), rows)
    return rows


if __name__ == "__main__":
    main()
