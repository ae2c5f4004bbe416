"""`python tune.py report --study NAME`: read a finished study from MLflow and write tables and figures.

Groups finished trials by dataset, horizon and searched values (seeds pooled into mean +- std), then:
one searched parameter -> the sensitivity table and curve (metric vs value, one line per dataset, as in the
paper's hyperparameter figure); `model.vlm` -> the variant table (parameters, s/epoch, peak memory, MSE, MAE);
`model.model` -> models side by side; Optuna studies -> the best configurations and Optuna's parameter
importances. Writes report.md, results.csv and PNGs under --out/NAME and logs them to the study's parent run.
Selection is by validation; test metrics are reported. A "selection gap" section sets beside it what choosing
by test MSE (the official search script's way) would have reported on the same trials: a labelled diagnostic.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from timevlm.errors import ConfigError  # noqa: E402
from timevlm.overrides import short_name  # noqa: E402
from timevlm_platform import tracking  # noqa: E402
from timevlm_platform.paper import beside_paper, published  # noqa: E402
from timevlm_platform.selection import LABEL, selection_gap, summary_line  # noqa: E402
from timevlm_platform.search_space import tuner_groups  # noqa: E402
from timevlm_platform.spool import DurableRun  # noqa: E402
from timevlm_platform.study import VARIANT_KEY, StudySpec  # noqa: E402

METRICS = ("best_val_mse", "test_mse", "test_mae")
M4_METRICS = ("test_smape", "test_mase", "test_owa")


def collect(client: MlflowClient, experiment: str, study: str) -> tuple[str, pd.DataFrame]:
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ConfigError(f"no MLflow experiment {experiment!r}: run study {study!r} first (with the same "
                          "--epochs/--seeds/--datasets/--set options, if any)")
    parent = tracking.find_run(client, exp.experiment_id, **{tracking.ROLE_TAG: "study", tracking.STUDY_TAG: study})
    if parent is None:
        raise ConfigError(f"experiment {experiment!r} has no parent run for study {study!r}")
    runs = client.search_runs([exp.experiment_id], max_results=5000,
                              filter_string=f"tags.`{tracking.PARENT_TAG}` = '{parent.info.run_id}'")
    rows = []
    for r in runs:
        test = r.data.params.get("data.test_dataset")  # a parameter is a string: unset was logged as "None"
        row = {"run_id": r.info.run_id, "status": r.info.status, "dataset": r.data.params.get("data.dataset"),
               "horizon": int(r.data.params.get("model.pred_len", 0)),
               "seq_len": int(r.data.params.get("model.seq_len", 0)),
               "model": r.data.params.get("model.model"), "seed": r.data.params.get("train.seed"),
               "percent": int(r.data.params.get("data.percent") or 100),
               "test_dataset": test if test not in ("", "None") else None}
        row.update(searched_values(r))
        row.update({k: r.data.metrics.get(k) for k in (*METRICS, *M4_METRICS)})
        row.update({k: r.data.metrics.get(tracking.SYSTEM_PREFIX + k) for k in ("params_total", "seconds", "peak_mem_mb")})
        row["s_per_iter"] = _seconds_per_iteration(row["seconds"], r)
        rows.append(row)
    return parent.info.run_id, pd.DataFrame(rows)


def _seconds_per_iteration(epoch_seconds: float | None, run) -> float | None:
    """An epoch's wall time over its training batches (full batches: the loader drops a last short one), the
    paper's s/iter (Tables 7-8; theirs on a GPU, validation not counted)."""
    windows = run.data.metrics.get(tracking.SYSTEM_PREFIX + "n_train_windows")
    batch = run.data.params.get("train.batch_size")
    if epoch_seconds is None or not windows or not batch:
        return None
    return epoch_seconds / max(1, int(windows) // int(batch))


def searched_values(run) -> dict[str, Any]:
    """What the sampler or grid set for a trial: its `timevlm.searched` tag (runs before that tag existed logged
    them as `searched.*` parameters)."""
    tag = run.data.tags.get(tracking.SEARCHED_TAG)
    if tag is not None:
        return {k: _num(str(v)) if not isinstance(v, (int, float)) else v for k, v in json.loads(tag).items()}
    return {k[len("searched."):]: _num(v) for k, v in run.data.params.items() if k.startswith("searched.")}


def _num(v: str):
    try:
        f = float(v)
        return int(f) if f.is_integer() and "." not in v else f
    except ValueError:
        return v


def summarize(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """One row per configuration over its finished runs (seeds pooled). A trial its scheduler stopped early is
    finished without test figures: it counts in `n` and `stopped` and its validation figure in `val_mse`."""
    done = df[df["status"] == "FINISHED"]
    by = ["dataset", "test_dataset", "percent", "horizon", *keys] + (["seq_len"] if "model.seq_len" not in keys else []) \
        + (["model"] if "model.model" not in keys else [])  # variants may name the model (e.g. a baseline)
    agg = done.assign(stopped=done["test_mse"].isna()).groupby(by, dropna=False).agg(
        n=("test_mse", "size"), stopped=("stopped", "sum"), val_mse=("best_val_mse", "mean"),
        test_mse=("test_mse", "mean"),
        test_mse_std=("test_mse", "std"), test_mae=("test_mae", "mean"), test_mae_std=("test_mae", "std"),
        params=("params_total", "mean"), s_per_epoch=("seconds", "mean"), s_per_iter=("s_per_iter", "mean"),
        peak_mem_mb=("peak_mem_mb", "max"),
        **{m[len("test_"):]: (m, "mean") for m in M4_METRICS if done[m].notna().any()})
    return agg.reset_index()


def sensitivity_plot(summary: pd.DataFrame, key: str, path: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for metric, ax in zip(("test_mse", "test_mae"), axes):
        for (ds, h), g in summary.groupby(["dataset", "horizon"]):
            g = g.sort_values(key)
            categorical = not pd.api.types.is_numeric_dtype(g[key])  # e.g. models, VLM variants: no line
            x = g[key].astype(str) if categorical else g[key]
            ax.errorbar(x, g[metric], yerr=g[f"{metric}_std"].fillna(0), marker="o", capsize=3, label=f"{ds}-{h}",
                        linestyle="none" if categorical else "-")
        ax.set_xlabel(key)
        ax.set_ylabel(metric.replace("_", " ").upper())
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"sensitivity to {key} (mean +- std over seeds; selection on validation)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


MIN_TRIALS_FOR_IMPORTANCE = 20  # below this many finished trials per cell, importances are noise, not a finding


def importances(storage: str, study_name: str) -> tuple[pd.Series, int] | None:
    """The searched parameters' importances from Optuna's own record of the study (`storage`, `study_name`), with
    the evaluator optuna-dashboard uses (PED-ANOVA on the COMPLETE trials), so the report and the dashboard show
    one figure; and how many trials it rests on. None when Optuna kept no such study or fewer than 2 trials."""
    import warnings

    import optuna
    from optuna.importance import PedAnovaImportanceEvaluator

    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        return None
    n = sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    if n < 2:
        return None
    with warnings.catch_warnings():  # Optuna warns whenever a target is given to PED-ANOVA
        warnings.simplefilter("ignore")
        imp = optuna.importance.get_param_importances(study, target=lambda t: t.values[0],
                                                      evaluator=PedAnovaImportanceEvaluator())
    return pd.Series(imp, dtype=float).rename("importance"), n


def ablation_table(summary: pd.DataFrame, reference: str) -> pd.DataFrame:
    """The paper's Table 6 layout: each variant's MSE/MAE and its change in % against `reference` (the full
    model) on the same dataset and horizon, and whether the change is larger than the seed spread (the larger
    of the two variants' standard deviations over seeds; False when either has one seed)."""
    rows = []
    for (ds, h), g in summary.groupby(["dataset", "horizon"], sort=False):
        g = g.set_index(VARIANT_KEY)
        if reference not in g.index:
            continue
        ref = g.loc[reference]
        for name, r in g.iterrows():
            spread = max(r["test_mse_std"], ref["test_mse_std"])
            rows.append({"dataset": ds, "horizon": h, VARIANT_KEY: name, "n": r["n"], "test_mse": r["test_mse"],
                         "test_mae": r["test_mae"],
                         "mse_change_pct": 100 * (r["test_mse"] - ref["test_mse"]) / ref["test_mse"],
                         "mae_change_pct": 100 * (r["test_mae"] - ref["test_mae"]) / ref["test_mae"],
                         "beyond_seed_spread": bool(pd.notna(spread) and abs(r["test_mse"] - ref["test_mse"]) > spread)})
    return pd.DataFrame(rows)


def _reasons(skipped: dict[str, str]) -> str:
    """Why each skipped VLM could not run, the VLMs that failed the same way named together."""
    by_reason: dict[str, list[str]] = {}
    for vlm, why in skipped.items():
        by_reason.setdefault(why.split("): ", 1)[-1].rstrip("."), []).append(vlm)
    return "; ".join(f"{', '.join(vlms)}: {reason}" for reason, vlms in by_reason.items())


def not_run_rows(skipped: dict[str, str], summary: pd.DataFrame, spec: StudySpec) -> pd.DataFrame:
    """The published average-over-horizons row of each VLM variant a study skipped, for each dataset (at the
    training percent and input length) it ran."""
    rows = []
    for vlm in skipped:
        for (ds, percent, seq_len), _ in summary.groupby(["dataset", "percent", "seq_len"]):
            row = {"dataset": ds, "horizon": "avg", "model.vlm": vlm}
            for metric in ("mse", "mae", "params_m", "mem_mib", "s_per_iter"):
                found = published(spec.protocol.get("type", "long_term"), metric, dataset=ds, horizon="avg",
                                  model="timevlm", vlm=vlm, percent=percent, seq_len=seq_len)
                row[f"paper_{metric}"] = found[0] if found else None
            rows.append(row)
    return pd.DataFrame(rows)


def _with_paper(table: pd.DataFrame, spec: StudySpec, model: str) -> pd.DataFrame:
    """Published values and our difference in % beside each matching row (see timevlm_platform.paper)."""
    t = table if ("model.model" in table or "model" in table) else table.assign(**{"model.model": model})
    t = t.rename(columns={"model.model": "model", "model.seq_len": "seq_len", "model.vlm": "vlm"})
    if VARIANT_KEY in t and spec.variants:  # the paper's variants are "full" and its ablations ("w/o ...")
        t[VARIANT_KEY] = t[VARIANT_KEY].where(t[VARIANT_KEY].astype(str).str.startswith("w/o"), "full")
    if "test_dataset" in t:  # zero-shot: trained on `dataset` (the source), tested on `test_dataset`
        zero = t["test_dataset"].notna()
        t["source"] = t["dataset"].where(zero, None)
        t["dataset"] = t["test_dataset"].where(zero, t["dataset"])
    out = beside_paper(t, spec.protocol.get("type", "long_term"))
    extra = [c for c in out.columns if c.startswith(("paper_", "delta_")) and out[c].notna().any()]
    return table.assign(**{c: out[c] for c in extra})


_COLUMN_FORMAT = {"params": ",.0f", "peak_mem_mb": ".0f", "s_per_epoch": ".1f", "s_per_iter": ".3f", "n": ".0f",
                  "stopped": ".0f",
                  "mse_change_pct": "+.1f", "mae_change_pct": "+.1f", "selection_gap_pct": "+.1f", "configs": ".0f", "paper_params_m": ".1f",
                  "paper_mem_mib": ".0f", "paper_s_per_iter": ".2f"}


def _markdown(df: pd.DataFrame) -> str:
    """A markdown table with metrics at 4 decimals and counts, memory and seconds in readable units."""
    blank = df.astype(object).where(df.notna(), None)  # missing values print as empty cells, not "nan"
    formats = [_COLUMN_FORMAT.get(str(c), "+.1f" if str(c).startswith("delta_") else ".4f") for c in df.columns]
    return blank.to_markdown(index=False, floatfmt=tuple(formats),
                             missingval="")


def write_report(spec: StudySpec, tracking_uri: str | None, out: str, experiment: str | None = None,
                 optuna_storage: str | None = None) -> Path:
    from timevlm_platform.settings import resolve_paths

    paths = resolve_paths(tracking_uri=tracking_uri, optuna_storage=optuna_storage)
    uri, optuna_storage = paths.tracking_uri, paths.optuna_storage
    tracking.check_reachable(uri)
    client = MlflowClient(uri)
    exp_name = experiment or f"timevlm-{spec.name}"
    # where the study's Optuna searchers (one per cell) kept their trials
    optuna_studies = {cells[0].label: f"{exp_name}/{run_name}" for run_name, cells in tuner_groups(spec)}
    parent, df = collect(client, exp_name, spec.name)
    if df.empty:
        raise ConfigError(f"study {spec.name!r} has no trial runs yet")
    keys = [k for k in spec.searched_keys if k != "train.seed" and k in df.columns]
    summary = summarize(df, keys)
    dest = Path(out) / spec.name
    dest.mkdir(parents=True, exist_ok=True)
    df.to_csv(dest / "trials.csv", index=False)
    summary.to_csv(dest / "results.csv", index=False)
    cols = ["dataset", "test_dataset", "percent", "horizon", *keys, "model", "seq_len", "n", "stopped", "val_mse",
            "test_mse", "test_mse_std", "test_mae", "test_mae_std", "smape", "mase", "owa", "params", "s_per_epoch",
            "s_per_iter", "peak_mem_mb"]
    model = str(df["model"].dropna().iloc[0]) if df["model"].notna().any() else "timevlm"
    # columns that would be empty are left out: the zero-shot target, standard deviations with one seed per
    # configuration, `stopped` when the scheduler stopped none
    empty = {c for c in ("test_dataset", "test_mse_std", "test_mae_std") if c in summary and summary[c].isna().all()}
    empty |= {"stopped"} if "stopped" in summary and not summary["stopped"].any() else set()
    cols = [c for c in cols if c in summary and c not in empty]
    main = _with_paper(summary[cols], spec, model)
    paper = any(str(c).startswith("paper_") for c in main.columns)
    stopped = int(summary["stopped"].sum()) if "stopped" in summary else 0
    lines = [f"# Study `{spec.name}`", "", spec.description, "",
             f"{len(df)} trial runs ({(df['status'] == 'FINISHED').sum()} finished"
             + (f", {stopped} of them stopped early by the scheduler: in `n` and `val_mse`, without test figures"
                if stopped else "")
             + "); test metrics on the scaled data, "
             + ("mean +- std over seeds (n)" if "test_mse_std" in cols else "one run per configuration")
             + "; configurations selected on validation."
             + (" `paper_*`: the published figure where one matches (protocol, dataset, source set, training "
                "percent, horizon, model, variant, VLM), at the paper's own settings (Time-VLM: seq_len 512, CLIP), "
                "and `delta_*_pct` ours against it." if paper else ""), "",
             _markdown(main), ""]
    if len(summary["horizon"].unique()) > 1:
        by = [c for c in ("dataset", "test_dataset", "percent") if c in cols] + keys + [c for c in ("model",) if c in cols] + (
            ["seq_len"] if "seq_len" in summary else [])  # averages match at their length
        # the paper's averages over horizons, its efficiency figures too (Tables 7-8 average them the same way)
        averaged = [c for c in ("test_mse", "test_mae", "params", "s_per_iter", "peak_mem_mb") if c in cols]
        avg = summary.groupby(by, dropna=False)[averaged].mean().reset_index()
        lines += ["## Averaged over horizons", "", _markdown(_with_paper(avg.assign(horizon="avg"), spec, model)),
                  ""]
    varying = [c for c in ("model", "seq_len") if c in summary and c not in keys and summary[c].nunique() > 1]
    gap = selection_gap(summary, keys + varying, val="val_mse")
    if not gap.empty and gap["configs"].max() > 1:
        gap.to_csv(dest / "selection_gap.csv", index=False)
        lines += ["## Selection gap (diagnostic, not a result)", "",
                  "Every figure above is the validation choice. The official search script picks each setting's "
                  "configuration by *test* MSE (one seed), and the paper reports that choice; here both choices on "
                  "the same trials, and how far the validation choice's test MSE lies above the test choice's "
                  f"(`selection_gap_pct`). {LABEL}: never used for `@best` or the registry.", "",
                  _markdown(gap), "", summary_line(gap), ""]
    skipped = json.loads(client.get_run(parent).data.tags.get(tracking.SKIPPED_TAG, "{}"))
    if skipped:
        lines += ["## Not run here", "", "In the study, but their weights were not where it ran, so they have no "
                  "trials (their loaders are tested on tiny configs, tests/test_vlm_adapters.py): "
                  + _reasons(skipped) + ". The paper's figures for them:", "",
                  _markdown(not_run_rows(skipped, summary, spec)), ""]
    if spec.variants and VARIANT_KEY in keys:
        reference = next(iter(spec.variants))
        ablation = ablation_table(summary, reference)
        ablation.to_csv(dest / "ablation.csv", index=False)
        lines += [f"## Ablation (change against `{reference}`, as in the paper's Table 6)", "",
                  _markdown(ablation), ""]
    figures = []
    if len(keys) == 1:
        figures.append(sensitivity_plot(summary, keys[0], dest / f"sensitivity_{short_name(keys[0])}.png"))
        lines += [f"![sensitivity]({figures[-1].name})", ""]
    elif len(keys) > 1 and spec.searcher == "optuna":
        best = df[df["best_val_mse"].notna()].sort_values("best_val_mse").head(5)
        lines += ["## Best configurations (by validation)", "",
                  _markdown(best[["dataset", "horizon", *keys, *METRICS]]), ""]
        for label, name in optuna_studies.items():
            found = importances(optuna_storage, name)
            if found is None:
                continue
            imp, n = found
            caveat = (f" **{n} finished trials: fewer than {MIN_TRIALS_FOR_IMPORTANCE}, too few for importances to "
                      f"mean anything; shown only so the numbers are not a surprise.**"
                      if n < MIN_TRIALS_FOR_IMPORTANCE else f" From {n} finished trials.")
            lines += [f"## Parameter importances, {label} (Optuna, PED-ANOVA: what optuna-dashboard shows)", "",
                      f"Importance for validation `{spec.metric}`, read from Optuna's study `{name}`.{caveat}", "",
                      imp.to_frame().to_markdown(floatfmt=".3f"), ""]
            if n >= MIN_TRIALS_FOR_IMPORTANCE:
                fig, ax = plt.subplots(figsize=(5, 2.8))
                imp.sort_values().plot.barh(ax=ax)
                ax.set_xlabel(f"importance for validation {spec.metric}")
                fig.tight_layout()
                figures.append(dest / f"importances_{label}.png")
                fig.savefig(figures[-1], dpi=110)
                plt.close(fig)
                lines += [f"![importances]({figures[-1].name})", ""]
    (dest / "report.md").write_text("\n".join(lines))
    tables = [dest / n for n in ("report.md", "results.csv", "trials.csv", "ablation.csv", "selection_gap.csv")
              if (dest / n).exists()]
    run = DurableRun(client, parent, None, count_delays=False)
    for f in [*tables, *figures]:
        run.log_artifact(f, "report")
    if not run.flush_until(60):
        print(f"WARNING: MLflow did not answer for 60 s; the report's artifacts wait in {run.journal}, and the "
              f"next `tune.py report` sends them first", file=sys.stderr)
    print("\n".join(lines))
    print(f"\nwrote {dest} (also logged to MLflow run {parent}, artifacts/report)")
    return dest
