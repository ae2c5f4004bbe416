"""Accuracy runs for the fidelity question (does Time-VLM beat its baselines?) without Ray.

A plan (YAML, `benchmarks/plans/`) names the runs; each is the library's own `run_experiment` (the same splits, fit, validation-only selection and test
metrics a Tune trial runs), one process per run, `--parallel` at a time; the VLM features each run needs
are built first, once per distinct cache key. Rows are appended to `<out>/runs.csv` as runs finish, so a
cut-off measurement keeps what finished. `--quick` shrinks every run (128 windows per split, 1 epoch) to
check a plan end to end on a laptop.

    python benchmarks/fidelity.py --plan-file benchmarks/plans/few_shot.yaml --out reports/accuracy --parallel 2
    python benchmarks/fidelity.py --plan-file benchmarks/plans/few_shot.yaml --quick --match '^ETTh1-512-96' --out /tmp/f
    python benchmarks/fidelity.py summarize reports/accuracy/*.csv     # markdown tables, sorted by validation
    python benchmarks/fidelity.py plot reports/ablation/weather_10pct.csv reports/ablation/weather_10pct.png  # seeds as dots
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
from concurrent.futures.process import BrokenProcessPool
import copy
import csv
import multiprocessing as mp
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SEEDS = (2021, 2022)
FIELDS = ["setting", "dataset", "seq_len", "pred_len", "variant", "seed", "test_mse", "test_mae", "best_val_mse",
          "best_epoch", "epochs_run", "residual_scale", "head_scale", "seconds_per_epoch", "params_trainable", "wall_s", "device",
          "error"]


@dataclass
class Run:
    dataset: str
    seq_len: int
    pred_len: int
    variant: str
    seed: int
    config: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def setting(self) -> str:
        data = self.config.get("data", {})
        target = f">{data['test_dataset']}" if data.get("test_dataset") else ""
        percent = f"-{data['percent']}pct" if data.get("percent", 100) != 100 else ""
        if percent and data.get("few_shot") == "first":  # unlabelled: the default, random cut
            percent += "-first"
        return f"{self.dataset}{target}-{self.seq_len}-{self.pred_len}{percent}"

    def experiment(self, quick: bool, device: str) -> dict[str, dict[str, Any]]:
        cfg = copy.deepcopy(self.config)
        cfg.setdefault("model", {}).update(seq_len=self.seq_len, pred_len=self.pred_len)
        cfg.setdefault("data", {})["dataset"] = self.dataset
        cfg.setdefault("train", {}).update(seed=self.seed, device=device, num_threads=1, progress=False)
        if quick:
            cfg["data"]["max_windows"] = 128
            cfg["train"]["epochs"] = 1
        return cfg


def plan_from_file(path: str) -> list[Run]:
    """Runs from a YAML plan (benchmarks/plans/*.yaml): per block, datasets x horizons x variants x seeds, each
    variant's settings ({section: {key: value}}, optionally `preset: NAME`, resolved per dataset and horizon)
    laid over the block's `config`; everything else is the library's defaults."""
    import yaml

    from timevlm.overrides import lay
    from timevlm.presets import preset_overrides

    spec = yaml.safe_load(open(path))
    runs = []
    for block in spec["runs"]:
        for dataset in block["datasets"]:
            for horizon in block["horizons"]:
                for variant, settings in block["variants"].items():
                    settings = copy.deepcopy(settings or {})
                    preset = settings.pop("preset", None)
                    layers = ([preset_overrides(preset, dataset, horizon)] if preset else []) + [settings]
                    cfg = lay(block.get("config", {}), *layers)
                    for seed in block.get("seeds", SEEDS):
                        runs.append(Run(dataset, cfg["model"].get("seq_len", block.get("seq_len", 512)), horizon,
                                        variant, seed, copy.deepcopy(cfg)))
    return runs


def _prebuild(cfg: dict, threads: int = 0) -> str:
    """Build (or find) every split's VLM features for one config; returns a one-line summary."""
    import torch

    from timevlm.config import ExperimentConfig
    from timevlm.experiment import prepare

    if threads:  # builds side by side share the cores (two 2-thread builds on 2 cores ran at a third of one)
        torch.set_num_threads(threads)
    exp = ExperimentConfig.from_dict(cfg)
    t0 = time.perf_counter()
    p = prepare(exp, progress=False)
    return (f"{exp.data.dataset} L{exp.model.seq_len} img{exp.model.image_size}: "
            f"{p.cache_info.get('cache_builds', 0)} built in {time.perf_counter() - t0:.0f}s")


def _row_head(run: Run) -> dict[str, Any]:
    return {"setting": run.setting, "dataset": run.dataset, "seq_len": run.seq_len, "pred_len": run.pred_len,
            "variant": run.variant, "seed": run.seed}


def _train(run: Run, cfg: dict) -> dict[str, Any]:
    import torch

    from timevlm.config import ExperimentConfig
    from timevlm.experiment import run_experiment

    row = _row_head(run)
    t0 = time.perf_counter()
    try:
        out = run_experiment(ExperimentConfig.from_dict(cfg))
        row.update({k: out.get(k) for k in FIELDS if k in out})
        row["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    except Exception as e:  # a failed run is a row that says why, never a silent gap
        row["error"] = f"{type(e).__name__}: {e}"
    row["wall_s"] = round(time.perf_counter() - t0, 1)
    return row


def _feature_configs(runs: list[Run], cfgs: list[dict]) -> list[dict]:
    from timevlm.config import ExperimentConfig
    from timevlm.model.multimodal import encoder_settings

    seen, out = set(), []
    for run, cfg in zip(runs, cfgs):
        exp = ExperimentConfig.from_dict(cfg)
        if exp.model.model != "timevlm":
            continue
        full = ExperimentConfig.from_dict({**cfg, "model": {**cfg["model"], "use_val": True, "use_tal": True,
                                                            "use_ral": True}})
        # the seed draws a random few-shot cut's training windows, so it is part of what the features are for
        key = (run.dataset, str(encoder_settings(full.model)), str(cfg["data"]), run.seed)
        if key not in seen:
            seen.add(key)
            out.append(full.to_dict())
    return out


def summarize(paths: list[str]) -> str:
    """Markdown: per setting, every variant's mean +- std over seeds, sorted by validation MSE (the selector)."""
    import pandas as pd

    df = pd.concat([pd.read_csv(p) for p in paths], ignore_index=True)
    failed = df[df["error"].notna()]
    df = df[df["error"].isna()]
    agg = df.groupby(["setting", "variant"]).agg(
        n=("test_mse", "size"), val_mse=("best_val_mse", "mean"), test_mse=("test_mse", "mean"),
        test_mse_std=("test_mse", "std"), test_mae=("test_mae", "mean"), test_mae_std=("test_mae", "std"),
        best_epoch=("best_epoch", "mean"), residual_open=("residual_scale", "mean"),
        head_open=("head_scale", "mean"),
        params=("params_trainable", "mean")).reset_index()
    out = []
    for setting, g in agg.groupby("setting", sort=False):
        out += [f"### {setting}", "", g.drop(columns="setting").sort_values("val_mse").to_markdown(
            index=False, floatfmt=(".0f", ".0f", ".4f", ".4f", ".4f", ".4f", ".4f", ".1f", ".2f", ".2f", ",.0f"),
            missingval=""), ""]
    df["over"] = [re.sub(rf"-{h}(?=-|$)", "", s, count=1) for s, h in zip(df["setting"], df["pred_len"])]
    per_seed = df.groupby(["over", "variant", "seed"]).agg(test_mse=("test_mse", "mean"), test_mae=("test_mae", "mean"),
                                                          horizons=("pred_len", "nunique")).reset_index()
    avg = per_seed.groupby(["over", "variant"]).agg(
        horizons=("horizons", "min"), seeds=("seed", "size"), test_mse=("test_mse", "mean"),
        test_mse_std=("test_mse", "std"), test_mae=("test_mae", "mean")).reset_index()
    if (avg["horizons"] > 1).any():  # the mean over horizons per seed, then over seeds (the paper's "avg" rows)
        out += ["### Averaged over horizons", "", avg[avg["horizons"] > 1].sort_values(["over", "test_mse"]).to_markdown(
            index=False, floatfmt=(".0f", ".0f", ".0f", ".0f", ".4f", ".4f", ".4f"), missingval=""), ""]
    if len(failed):
        out += [f"{len(failed)} run(s) failed: " + "; ".join(f"{r.setting} {r.variant} {r.seed}: {r.error}"
                                                          for r in failed.itertuples())]
    return "\n".join(out)


def plot(paths: list[str], out: str) -> Path:
    """A PNG per the runs in `paths`: one panel per setting, a bar per variant at its mean test MSE over seeds with
    each seed as a dot, so a difference can be read against the spread between seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    df = pd.concat([pd.read_csv(p) for p in paths], ignore_index=True)
    df = df[df["error"].isna()]
    settings = list(dict.fromkeys(df["setting"]))
    fig, axes = plt.subplots(1, len(settings), figsize=(5.5 * len(settings), 0.45 * df["variant"].nunique() + 1.6),
                             squeeze=False)
    for ax, setting in zip(axes[0], settings):
        g = df[df["setting"] == setting]
        # grouped by what was added to a variant ("", " + align", ...), the ablated ones after "full" in each group
        seen = list(dict.fromkeys(g["variant"]))
        base = {v: re.split(r" \+ |, ", v)[0] for v in seen}
        rank = {b: i for i, b in enumerate(dict.fromkeys(["full", "w/o RAL", "w/o VAL", "w/o TAL", "temporal only",
                                                           *base.values()]))}
        order = sorted(seen, key=lambda v: (v[len(base[v]):], rank[base[v]]))
        means = g.groupby("variant")["test_mse"].mean().reindex(order)
        ax.barh(range(len(order)), means.values, color="#9ecae1")
        for i, v in enumerate(order):
            seeds = g.loc[g["variant"] == v, "test_mse"]
            ax.plot(seeds, [i] * len(seeds), "o", color="#08519c", ms=4)
        ax.set_yticks(range(len(order)), order)
        ax.invert_yaxis()
        lo, hi = g["test_mse"].min(), g["test_mse"].max()
        pad = max(hi - lo, 0.08 * hi) / 4  # at least 8% of the scale shown: a 0.3% difference looks like one
        ax.set_xlim(lo - pad, hi + pad)
        ax.set_xlabel("test MSE (bar: mean over seeds; dots: seeds)")
        ax.set_title(setting)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)


def main(argv: list[str] | None = None) -> Path:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["summarize"]:
        print(summarize(argv[1:]))
        return Path(".")
    if argv[:1] == ["plot"]:  # plot CSV... PNG
        return plot(argv[1:-1], argv[-1])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plan-file", required=True, help="a YAML plan (benchmarks/plans/)")
    ap.add_argument("--out", default="reports/accuracy")
    ap.add_argument("--parallel", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quick", action="store_true", help="128 windows per split, 1 epoch: a plumbing check")
    ap.add_argument("--seeds", type=int, nargs="*", help="keep only these seeds")
    ap.add_argument("--epochs", type=int, help="override every run's epochs (a reduced budget, say so)")
    ap.add_argument("--match", default="", help="regex: keep runs whose '<setting> <variant>' it matches")
    args = ap.parse_args(argv)

    runs = [r for r in plan_from_file(args.plan_file) if re.search(args.match, f"{r.setting} {r.variant}")]
    runs = [r for r in runs if not args.seeds or r.seed in args.seeds]
    cfgs = [r.experiment(args.quick, args.device) for r in runs]
    for c in cfgs:
        if args.epochs:
            c["train"]["epochs"] = args.epochs
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "runs.csv"
    ctx = mp.get_context("spawn")
    t0 = time.perf_counter()
    feature_cfgs = _feature_configs(runs, cfgs)
    print(f"{len(runs)} runs; building features for {len(feature_cfgs)} settings", flush=True)
    builders = min(len(feature_cfgs), args.parallel) or 1
    threads = max(1, (os.cpu_count() or 1) // builders) if builders > 1 else 0
    with cf.ProcessPoolExecutor(builders, mp_context=ctx) as pool:
        for line in pool.map(_prebuild, feature_cfgs, [threads] * len(feature_cfgs)):
            print(f"  features {line}", flush=True)
    print(f"features ready after {time.perf_counter() - t0:.0f}s", flush=True)
    new = not csv_path.exists()
    with open(csv_path, "a", newline="") as f, cf.ProcessPoolExecutor(args.parallel, mp_context=ctx) as pool:
        writer = csv.DictWriter(f, FIELDS)
        if new:
            writer.writeheader()
        # longest first (seq_len 512, Time-VLM, larger sets), so the pool does not end on one straggler
        order = sorted(range(len(runs)), key=lambda i: (-runs[i].seq_len, not runs[i].dataset.startswith("ETTm"),
                                                         "Time-VLM" not in runs[i].variant))
        futures = {pool.submit(_train, runs[i], cfgs[i]): runs[i] for i in order}
        for done, fut in enumerate(cf.as_completed(futures), 1):
            try:
                row = fut.result()
            except BrokenProcessPool as e:  # a run's process died (the OOM killer, say): the pool is
                # gone, so this run and every one still waiting get a row that says so, never a silent gap
                row = {**_row_head(futures[fut]), "error": f"BrokenProcessPool: a run's process died (killed for "
                                                           f"memory? fewer --parallel); not finished ({e})"}
            writer.writerow(row)
            f.flush()
            status = row.get("error") or (f"test MSE {row['test_mse']:.4f} MAE {row['test_mae']:.4f} "
                                          f"(val {row['best_val_mse']:.4f}, epoch {row['best_epoch']})")
            print(f"[{done}/{len(runs)} {time.perf_counter() - t0:.0f}s] {row['setting']} {row['variant']} "
                  f"seed {row['seed']}: {status}", flush=True)
    print(f"all runs done after {time.perf_counter() - t0:.0f}s -> {csv_path}", flush=True)
    return csv_path


if __name__ == "__main__":
    main()
