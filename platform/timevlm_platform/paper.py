"""Published numbers (paper/timevlm_icml2025.csv) and putting them beside ours in a report table."""
from __future__ import annotations

from functools import lru_cache
from importlib import resources

import pandas as pd

from timevlm.errors import ConfigError

COLUMNS = ["table", "protocol", "dataset", "horizon", "seq_len", "model", "variant", "metric", "value"]
METRICS = ("mse", "mae", "smape", "mase", "owa")


@lru_cache(maxsize=1)
def paper_results() -> pd.DataFrame:
    """Every published value, checked: known columns, metrics and protocols, positive numbers, no duplicates."""
    from timevlm_platform.study import PROTOCOLS

    path = resources.files("timevlm_platform") / "paper" / "timevlm_icml2025.csv"
    with resources.as_file(path) as p:
        df = pd.read_csv(p, comment="#", dtype={"horizon": str, "seq_len": "Int64"})
    where = f"{path.name}"
    if list(df.columns) != COLUMNS:
        raise ConfigError(f"{where}: columns {list(df.columns)} != {COLUMNS}")
    bad = df[~df["metric"].isin(METRICS) | ~df["protocol"].isin(PROTOCOLS) | ~(df["value"] > 0)
             | ~df["horizon"].str.fullmatch(r"\d+|avg")]
    if not bad.empty:
        raise ConfigError(f"{where}: bad rows (metric, protocol, horizon or value):\n{bad.to_string()}")
    key = ["protocol", "dataset", "horizon", "model", "variant", "metric"]
    if df.duplicated(key).any():
        raise ConfigError(f"{where}: duplicate rows:\n{df[df.duplicated(key, keep=False)].to_string()}")
    return df


def beside_paper(table: pd.DataFrame, protocol: str, metrics: tuple[str, ...] = ("mse", "mae")) -> pd.DataFrame:
    """`table` (columns dataset, horizon, model, optional variant and seq_len, test_<metric>) with
    `paper_<metric>` and `delta_<metric>_pct` (ours vs published, in %) added where a published row matches;
    horizon may be "avg" for horizon-averaged tables. A published row with a seq_len matches only rows at that
    input length. Rows without a published value keep NaN."""
    paper = paper_results()
    paper = paper[paper["protocol"] == protocol]
    out = table.copy()
    variant = out["variant"] if "variant" in out else pd.Series("full", index=out.index)
    seq_len = out["seq_len"] if "seq_len" in out else pd.Series(None, index=out.index, dtype=object)
    for metric in metrics:
        ours = f"test_{metric}"
        if ours not in out:
            continue
        lookup = {(r.dataset, r.horizon, r.model, r.variant): (r.value, r.seq_len)
                  for r in paper[paper["metric"] == metric].itertuples()}

        def match(d, h, m, v, length):
            value, at = lookup.get((d, str(h), str(m).lower(), v), (None, None))
            return value if value is not None and (pd.isna(at) or pd.isna(length) or int(at) == int(length)) else None

        published = [match(*row) for row in zip(out["dataset"], out["horizon"], out["model"], variant, seq_len)]
        out[f"paper_{metric}"] = pd.to_numeric(pd.Series(published, index=out.index, dtype=object))
        out[f"delta_{metric}_pct"] = 100 * (out[ours] - out[f"paper_{metric}"]) / out[f"paper_{metric}"]
    return out
