"""What test-set selection is worth: a diagnostic, never a result.

A study selects its best configuration on validation (`StudySpec.metric`); that is what `@best`, the registry, the
study's `study/*` metrics and every default use. The official Time-VLM search script
(`scripts/TimeVLM_search_parallel.sh`) instead keeps, per dataset and horizon, the configuration with the lowest
*test* MSE, and the paper's tables report that. `selection_gap` puts both choices side by side on the same
trials: the test MSE of the validation-selected configuration, the test MSE of the test-selected one, and how much
lower the second reads (the "selection gap"). Nothing here feeds back into selection.
"""
from __future__ import annotations

import pandas as pd

from timevlm.overrides import short_name

LABEL = "test-selected (diagnostic: the official search script's choice by test MSE; not a result)"
CELL_COLUMNS = ("dataset", "test_dataset", "percent", "horizon")


def selection_gap(trials: pd.DataFrame, keys: list[str], val: str = "best_val_mse",
                  test: str = "test_mse") -> pd.DataFrame:
    """Per cell (the CELL_COLUMNS present), over the configurations `keys` spell out (seeds averaged, one row per
    configuration): the validation-selected and the test-selected configuration, their test MSE, and
    `selection_gap_pct` = how far the validation-selected test MSE lies above the test-selected one (>= 0).
    Trials without a test figure (stopped early, failed) can be neither choice."""
    done = trials.dropna(subset=[val, test])
    if done.empty:
        return pd.DataFrame()
    cell = [c for c in CELL_COLUMNS if c in done and done[c].notna().any()]
    keys = [k for k in keys if k in done]
    configs = done.groupby(cell + keys, dropna=False)[[val, test]].mean().reset_index() if keys else done
    rows = []
    for where, g in configs.groupby(cell, dropna=False, sort=False):
        by_val, by_test = g.loc[g[val].idxmin()], g.loc[g[test].idxmin()]
        label = (lambda r: ", ".join(f"{short_name(k)}={r[k]}" for k in keys) or "-")
        rows.append({**dict(zip(cell, where if isinstance(where, tuple) else (where,))), "configs": len(g),
                     "val_selected": label(by_val), "val_selected_test_mse": float(by_val[test]),
                     "test_selected": label(by_test), "test_selected_test_mse": float(by_test[test]),
                     "selection_gap_pct": 100 * (float(by_val[test]) - float(by_test[test])) / float(by_test[test])})
    return pd.DataFrame(rows)


def summary_line(gap: pd.DataFrame) -> str:
    """One console line: the validation-selected and test-selected test MSE averaged over cells, and the gap."""
    v, t = gap["val_selected_test_mse"].mean(), gap["test_selected_test_mse"].mean()
    return (f"selection gap (diagnostic, not a result) over {len(gap)} cell(s): the validation-selected trials' "
            f"test MSE is {v:.4f}; choosing by test MSE, as the official search script does, would report {t:.4f} "
            f"({100 * (v - t) / t:+.1f}% for validation selection)")
