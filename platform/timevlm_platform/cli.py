"""`python tune.py [run] [--study NAME] [--smoke] [--resume] ...` and `python tune.py report --study NAME`."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from timevlm.errors import ConfigError, DataError
from timevlm.overrides import short_name


def _build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="tune.py", description="Time-VLM hyperparameter studies on Ray Tune + "
                                 "Optuna, every trial logged to MLflow.")
    ap.add_argument("command", nargs="?", default="run", choices=["run", "report", "visualize", "list"],
                    help="run a study (default), report a finished one, visualize a trial, or list the studies")
    ap.add_argument("--study", default="default", help="name in search_spaces/ or a path to a YAML file")
    ap.add_argument("--smoke", action="store_true", help="tiny budget (the study's `smoke` block)")
    ap.add_argument("--epochs", type=int, help="override the study's epochs per trial (a reduced-budget copy)")
    ap.add_argument("--seeds", type=int, help="override the study's number of seeds per grid point")
    ap.add_argument("--datasets", nargs="+", metavar="NAME", help="override the study's datasets")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override a fixed setting, e.g. --set model.seq_len=96 (repeatable)")
    ap.add_argument("--resume", action="store_true", help="continue an interrupted study (Tuner.restore)")
    ap.add_argument("--fresh", action="store_true", help="discard earlier Ray results of this study first")
    ap.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite store in ./mlruns)")
    ap.add_argument("--address", help="Ray cluster address (default: start a local Ray, or the job's cluster)")
    ap.add_argument("--storage-path", help="Ray results storage (default ./ray_results; shared on clusters)")
    ap.add_argument("--data-dir", help="data folder (default $TIMEVLM_DATA_DIR, then ../shared/data)")
    ap.add_argument("--cache-dir", help="VLM feature cache, local dir or fsspec URI (default $TIMEVLM_CACHE_DIR)")
    ap.add_argument("--no-feature-cache", action="store_true", help="compute VLM features at every step")
    ap.add_argument("--no-prebuild", action="store_true",
                    help="do not build the study's VLM features up front (each trial builds what it misses)")
    ap.add_argument("--experiment", help="MLflow experiment name (default timevlm-STUDY)")
    ap.add_argument("--optuna-storage", metavar="URL",
                    help="Optuna RDB storage (default: optuna.db beside the MLflow store; $TIMEVLM_OPTUNA_STORAGE)")
    ap.add_argument("-v", "--verbose", action="count", default=1,
                    help="-v: also Tune's own status tables (default: one line per finished trial)")
    ap.add_argument("--out", default="reports", help="report/visualize: output folder")
    ap.add_argument("--run-id", help="visualize: the MLflow run id of a trial")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _dispatch(args) -> int:
    from timevlm_platform.study import SEARCH_SPACES_DIR, load_study

    if args.command == "list":
        for p in sorted(SEARCH_SPACES_DIR.glob("*.yaml")):
            s = load_study(str(p))
            print(f"{s.name:14s} {s.description}")
        return 0
    if args.command == "visualize":
        if not args.run_id:
            raise ConfigError("visualize needs --run-id (a trial's MLflow run id)")
        from timevlm_platform.visualize import visualize

        visualize(args.run_id, args.tracking_uri, args.out, data_dir=args.data_dir, cache_dir=args.cache_dir)
        return 0
    spec = load_study(args.study)
    if args.smoke:
        spec = spec.with_smoke()
    spec = spec.with_overrides(epochs=args.epochs, seeds=args.seeds, datasets=args.datasets, settings=args.set)
    if args.command == "report":
        from timevlm_platform.report import write_report

        write_report(spec, args.tracking_uri, args.out, args.experiment, args.optuna_storage)
        return 0

    from timevlm_platform.runner import RunOptions, run_study

    out = run_study(spec, RunOptions(
        resume=args.resume, fresh=args.fresh, tracking_uri=args.tracking_uri, address=args.address,
        storage_path=args.storage_path, data_dir=args.data_dir, cache_dir=args.cache_dir,
        use_feature_cache=not args.no_feature_cache, prebuild=not args.no_prebuild,
        experiment_name=args.experiment, optuna_storage=args.optuna_storage, verbose=args.verbose))
    _print_summary(spec, out)
    table = out["table"]
    if len(table) and (table["status"] == "ERROR").all():
        print("error: every trial failed", file=sys.stderr)
        return 1
    return 0


def _plain(v):
    return v.item() if hasattr(v, "item") else v


def _print_summary(spec, out) -> None:
    import pandas as pd

    with pd.option_context("display.max_columns", 30, "display.width", 200, "display.float_format", "{:.4f}".format):
        print("\n== trials ==")
        print(out["table"].to_string(index=False))
    for label, best in out["best"].items():
        params = {key: _plain(best[short_name(key)]) for key in spec.searched_keys}
        print(f"\n== best on {label} (by validation {spec.metric}) ==\n"
              f"  trial {best['trial']}: {spec.metric} {best[spec.metric]:.4f}, test MSE {best['test_mse']:.4f}, "
              f"test MAE {best['test_mae']:.4f}\n  config: {params}")
    uri = out["tracking_uri"]
    print(f"\nstudy wall time {out['wall_seconds']:.0f}s; MLflow parent run {out['parent_run_id']}")
    if out["log_failures"]:
        print(f"WARNING: {out['log_failures']} MLflow logging call(s) failed (see stderr)")
    from timevlm_platform.tracking import experiment_url

    base = "http://127.0.0.1:5000" if uri.startswith("sqlite:") else uri
    if uri.startswith("sqlite:"):
        print(f"open the MLflow UI:  mlflow ui --backend-store-uri {uri}")
    print(f"the study's runs:    {experiment_url(base, out['experiment_id'])}")
    for name in out.get("registered", []):
        print(f"best model:          mlflow.pyfunc.load_model('models:/{name}@best')")
    if out.get("optuna_storage") and any(k for k in spec.search):
        print(f"Optuna's studies:    optuna-dashboard {out['optuna_storage']}")
