"""Published numbers (paper/timevlm_icml2025.csv, the paper's Tables 1-8) and putting them beside ours."""
from __future__ import annotations

from functools import lru_cache
from importlib import resources

import pandas as pd

from timevlm.errors import ConfigError

COLUMNS = ["table", "protocol", "dataset", "source", "percent", "horizon", "seq_len", "model", "variant", "vlm",
           "metric", "value", "note"]
PROTOCOLS = ("long_term", "few_shot", "zero_shot", "short_term", "efficiency")
METRICS = ("mse", "mae", "smape", "mase", "owa", "params_m", "mem_mib", "s_per_iter", "deg_pct_mse", "deg_pct_mae")
# published rows that match any value of ours where they leave the field empty
_WILDCARDS = ("source", "percent", "seq_len", "vlm")
# our report column -> (published metric, factor from our unit to the paper's)
OUR_COLUMNS = {"test_mse": ("mse", 1.0), "test_mae": ("mae", 1.0), "smape": ("smape", 1.0),
               "mase": ("mase", 1.0), "owa": ("owa", 1.0), "params": ("params_m", 1e-6),
               "peak_mem_mb": ("mem_mib", 1.0), "s_per_iter": ("s_per_iter", 1.0)}
_EFFICIENCY = ("params_m", "mem_mib", "s_per_iter")


@lru_cache(maxsize=1)
def paper_results() -> pd.DataFrame:
    """Every published value, checked: known columns, metrics and protocols, positive numbers, no duplicates."""
    path = resources.files("timevlm_platform") / "paper" / "timevlm_icml2025.csv"
    with resources.as_file(path) as p:
        df = pd.read_csv(p, comment="#", dtype=str, keep_default_na=False)
    where = f"{path.name}"
    if list(df.columns) != COLUMNS:
        raise ConfigError(f"{where}: columns {list(df.columns)} != {COLUMNS}")
    df["value"] = pd.to_numeric(df["value"], errors="coerce")
    bad = df[~df["metric"].isin(METRICS) | ~df["protocol"].isin(PROTOCOLS) | ~(df["value"] > 0)
             | ~df["horizon"].str.fullmatch(r"\d+|avg") | ~df["percent"].str.fullmatch(r"(\d+)?")
             | ~df["seq_len"].str.fullmatch(r"(\d+)?")]
    if not bad.empty:
        raise ConfigError(f"{where}: bad rows (metric, protocol, horizon, percent, seq_len or value):\n{bad.to_string()}")
    key = [c for c in COLUMNS if c not in ("table", "value", "note")]
    if df.duplicated(key).any():
        raise ConfigError(f"{where}: duplicate rows:\n{df[df.duplicated(key, keep=False)].to_string()}")
    return df


def _key(value) -> str:
    """A table cell as the published data writes it: "" for missing, integers without ".0", names as they are."""
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def published(protocol: str, metric: str, **fields) -> tuple[float, str] | None:
    """(value, table) of the published row that matches `fields` (dataset, horizon, model, variant, source,
    percent, seq_len, vlm), or None. A field of `_WILDCARDS` left empty on either side matches anything. Where
    several rows match, the most specific wins: one point per such field both sides fill, minus one per field
    only the published row fills (a CLIP row gets Table 8's CLIP figure, a row that names no VLM Table 5's);
    a tie between different values is no match (a few-shot row that does not say its percent)."""
    paper = paper_results()
    protocols = ("efficiency", protocol) if metric in _EFFICIENCY else (protocol,)
    rows = paper[paper["protocol"].isin(protocols) & (paper["metric"] == metric)]
    want = {k: _key(v) for k, v in fields.items()}
    want["model"] = want.get("model", "").lower()
    want.setdefault("variant", "full")
    for col in ("dataset", "horizon", "model", "variant"):
        rows = rows[rows[col] == want.get(col, "")]
    for col in _WILDCARDS:
        if want.get(col, ""):
            rows = rows[(rows[col] == "") | (rows[col] == want[col])]
    if rows.empty:
        return None
    filled = rows[list(_WILDCARDS)] != ""
    given = pd.Series({c: bool(want.get(c, "")) for c in _WILDCARDS})
    specific = (filled & given).sum(axis=1) - (filled & ~given).sum(axis=1)
    best = rows[specific == specific.max()]
    if best["value"].nunique() > 1:  # e.g. a few-shot row that does not say its percent: 5% or 10%?
        return None
    return float(best["value"].iloc[0]), str(best["table"].iloc[0])


def beside_paper(table: pd.DataFrame, protocol: str) -> pd.DataFrame:
    """`table` (columns dataset, horizon, model and our metric columns (test_mse, test_mae, smape, ..., params,
    peak_mem_mb); optional variant, seq_len, percent, source, vlm) with `paper_<metric>` and
    `delta_<metric>_pct` (ours vs published, in %) added where a published row matches, and `paper_table` naming
    where the MSE/MAE came from. Rows without a published value keep NaN."""
    out = table.copy()
    fields = [c for c in ("dataset", "horizon", "model", "variant", "source", "percent", "seq_len", "vlm") if c in out]
    tables: list[str | None] = [None] * len(out)
    for ours, (metric, factor) in OUR_COLUMNS.items():
        if ours not in out:
            continue
        found = [published(protocol, metric, **dict(zip(fields, row))) for row in out[fields].itertuples(index=False)]
        if not any(found):
            continue
        values = pd.Series([f[0] if f else None for f in found], index=out.index, dtype=float)
        out[f"paper_{metric}"] = values
        out[f"delta_{metric}_pct"] = 100 * (out[ours] * factor - values) / values
        if metric in ("mse", "mae", "smape", "owa"):
            tables = [t or (f[1] if f else None) for t, f in zip(tables, found)]
    if any(tables):
        out["paper_table"] = tables
    return out
