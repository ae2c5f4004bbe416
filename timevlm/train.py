"""Train and test one configuration from the command line, no Ray:

    python -m timevlm.train --set data.dataset=ETTh1 --set model.seq_len=96 --set model.pred_len=96

`--config FILE.yaml` gives a base ExperimentConfig ({model: ..., data: ..., train: ...}); each
`--set section.key=value` overrides one field (value parsed as YAML).
"""
from __future__ import annotations

import argparse
import json

import yaml

from timevlm.config import ExperimentConfig
from timevlm.experiment import run_experiment
from timevlm.overrides import lay, parse_assignments


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="YAML file with model/data/train sections")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = ap.parse_args(argv)
    base = yaml.safe_load(open(args.config)) if args.config else {}
    exp = ExperimentConfig.from_dict(lay(base or {}, parse_assignments(args.set)))
    out = run_experiment(exp)
    for e in out.pop("history"):
        print(f"epoch {e['epoch']:>2}  train {e['train_loss']:.4f}  val mse {e['val_mse']:.4f}  "
              f"val mae {e['val_mae']:.4f}  {e['seconds']:.1f}s")
    print(json.dumps(out, indent=1, default=str))
    print(f"test MSE {out['test_mse']:.4f}  test MAE {out['test_mae']:.4f}  "
          f"params {out['params_total']:,} (trainable {out['params_trainable']:,})")
    return out


if __name__ == "__main__":
    main()
