"""Declarative study files (search_spaces/*.yaml): parsing and validation with errors that name the key."""
from __future__ import annotations

import dataclasses
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from timevlm.config import ExperimentConfig, check_fields
from timevlm.data.registry import DATASETS
from timevlm.errors import ConfigError
from timevlm.overrides import SettingKey, lay, nest, parse_assignments, short_name

SEARCH_SPACES_DIR = Path(__file__).resolve().parents[2] / "search_spaces"
DISTRIBUTIONS = {"choice": ("values",), "grid": ("values",), "uniform": ("low", "high"),
                 "loguniform": ("low", "high"), "int": ("low", "high"), "quniform": ("low", "high", "q")}
METRICS = ("best_val_mse", "best_val_mae")
TOP_KEYS = {"name", "description", "datasets", "horizons", "fixed", "search", "searcher", "budget",
            "resources", "scheduler", "metric", "mode", "seed", "smoke", "seeds", "protocol", "preset", "variants",
            "unavailable_vlms"}
VARIANT_KEY = "variant"  # the searched parameter that names one of a study's `variants`
CELL_KEY = "cell"  # the grid parameter that names a trial's cell when one Tuner runs several cells


@dataclass
class Param:
    key: str  # "section.field", e.g. "model.norm_const"
    kind: str
    args: dict[str, Any]


@dataclass
class Resources:
    workers_per_trial: int = 1
    cpus_per_worker: int = 1
    gpus_per_worker: float = 0
    max_concurrent: int | None = None  # None: as many as the cluster's resources allow


@dataclass
class Scheduler:
    type: str = "asha"  # asha | fifo
    grace_period: int = 1
    reduction_factor: int = 2


PROTOCOLS = ("long_term", "few_shot", "zero_shot")
ZERO_SHOT_PAIRS = [["ETTh1", "ETTh2"], ["ETTh1", "ETTm2"], ["ETTh2", "ETTh1"], ["ETTh2", "ETTm2"],
                   ["ETTm1", "ETTh2"], ["ETTm1", "ETTm2"], ["ETTm2", "ETTh2"], ["ETTm2", "ETTm1"]]


@dataclass(frozen=True)
class Cell:
    """One Tune experiment of a study: train/validate on `dataset`, test on `test_dataset` (zero-shot) or itself."""

    dataset: str
    horizon: int
    test_dataset: str | None = None

    @property
    def label(self) -> str:
        target = f"-to-{self.test_dataset}" if self.test_dataset else ""
        return f"{self.dataset}{target}-{self.horizon}"


@dataclass
class StudySpec:
    name: str
    description: str = ""
    datasets: list[str] = field(default_factory=lambda: ["ETTh1"])
    horizons: list[int] = field(default_factory=lambda: [96])
    fixed: dict[str, dict[str, Any]] = field(default_factory=dict)
    search: list[Param] = field(default_factory=list)
    searcher: str = "optuna"  # optuna (TPE) | grid
    trials: int = 4
    epochs: int = 3
    resources: Resources = field(default_factory=Resources)
    scheduler: Scheduler = field(default_factory=Scheduler)
    metric: str = "best_val_mse"
    mode: str = "min"
    seed: int = 2021
    seeds: int = 1  # repeat each configuration over this many seeds
    smoke: dict[str, Any] = field(default_factory=dict)  # overrides applied by --smoke
    # {type: long_term} | {type: few_shot, percent: 5|10} | {type: zero_shot, pairs: [[source, target], ...]}
    protocol: dict[str, Any] = field(default_factory=lambda: {"type": "long_term"})
    # a named preset (timevlm.presets) laid over `fixed` for every cell, e.g. the official script's settings
    preset: str | None = None
    # named variants, run as a grid over `variant`: {"w/o VAL": {"model.use_val": False}, "official": {"preset":
    # "official"}}; each maps settings (section.key) and optionally a preset, applied per cell
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    # settings applied after everything else: a reduced budget or --set from the command line wins over presets
    forced: dict[str, dict[str, Any]] = field(default_factory=dict)
    # a searched `model.vlm` value whose weights are not on this cluster: "error" stops the study before any
    # trial; "skip" runs the others and records which were skipped and why (its report lists them as not run)
    unavailable_vlms: str = "error"
    source: str = ""

    def experiment(self, dataset: str, horizon: int, params: dict[str, Any],
                   test_dataset: str | None = None) -> ExperimentConfig:
        """The ExperimentConfig of one trial: fixed settings, the study's preset, the cell and protocol, the
        variant's preset and settings, the sampled params, then forced settings (reduced budgets)."""
        from timevlm.presets import preset_overrides

        params = dict(params)
        variant = dict(self.variants[params.pop(VARIANT_KEY)]) if VARIANT_KEY in params else {}
        presets = [preset_overrides(p, dataset, horizon) for p in (self.preset, variant.pop("preset", None)) if p]
        cell = {"data": {"dataset": dataset, **({"test_dataset": test_dataset} if test_dataset else {}),
                         **({"percent": int(self.protocol.get("percent", 10))}
                            if self.protocol.get("type") == "few_shot" else {})},
                "model": {"pred_len": horizon}}
        budget = {"train": {"epochs": self.epochs}}  # under everything else: a preset's or a file's epochs win
        return ExperimentConfig.from_dict(lay(budget, self.fixed, *presets, cell, nest({**variant, **params}),
                                              self.forced))

    @property
    def searched_keys(self) -> list[str]:
        """What varies between a cell's trials: the searched parameters, and `variant` when there are variants."""
        return [p.key for p in self.search] + ([VARIANT_KEY] if self.variants else [])

    def cells(self) -> list[Cell]:
        if self.protocol.get("type") == "zero_shot":
            pairs = self.protocol.get("pairs") or ZERO_SHOT_PAIRS
            return [Cell(src, h, tgt) for (src, tgt), h in itertools.product(pairs, self.horizons)]
        return [Cell(ds, h) for ds, h in itertools.product(self.datasets, self.horizons)]

    def without_values(self, key: str, drop: list[Any]) -> "StudySpec":
        """A copy whose grid/choice over `key` leaves out `drop` (the same study: its name does not change)."""
        search = []
        for p in self.search:
            if p.key == key and "values" in p.args:
                kept = [v for v in p.args["values"] if v not in drop]
                if not kept:
                    raise ConfigError(f"study {self.name}: none of {key}'s values {p.args['values']} can run here")
                p = dataclasses.replace(p, args={**p.args, "values": kept})
            search.append(p)
        return dataclasses.replace(self, search=search)

    def with_smoke(self) -> "StudySpec":
        """A tiny-budget copy for --smoke: the study's `smoke` block overrides budget and fixed settings."""
        s = dataclasses.replace(self, fixed={k: dict(v) for k, v in self.fixed.items()})
        sm = self.smoke or {}
        s.trials = int(sm.get("trials", min(self.trials, 2)))
        s.epochs = int(sm.get("epochs", 1))
        s.datasets = list(sm.get("datasets", self.datasets[:1]))
        if self.protocol.get("type") == "zero_shot":
            s.protocol = {**self.protocol, "pairs": (self.protocol.get("pairs") or ZERO_SHOT_PAIRS)[:1]}
        s.horizons = list(sm.get("horizons", self.horizons[:1]))
        s.forced = {k: dict(v) for k, v in self.forced.items()}
        for section, values in (sm.get("fixed") or {}).items():
            s.fixed.setdefault(section, {}).update(values)
            s.forced.setdefault(section, {}).update(values)  # a smoke run's settings win over presets
        if "search" in sm:
            s.search = [_parse_param(k, v, f"{self.source or self.name} (smoke)") for k, v in sm["search"].items()]
        s.fixed.setdefault("data", {}).setdefault("max_windows", 256)
        s.fixed["train"] = {**s.fixed.get("train", {}), "epochs": s.epochs}
        s.forced.setdefault("train", {})["epochs"] = s.epochs
        s.forced.setdefault("data", {})["max_windows"] = s.fixed["data"]["max_windows"]
        s.validate()
        return s

    def with_overrides(self, *, epochs: int | None = None, seeds: int | None = None,
                       datasets: list[str] | None = None, settings: list[str] | None = None) -> StudySpec:
        """A changed copy (e.g. a reduced budget for a CPU): `settings` are `section.key=value` fixed settings.

        The copy is a different study, so its name says what changed (`baselines-epochs3-seeds2`): its MLflow
        experiment, Ray results and `--resume` never mix with the full study's. `report` with the same flags
        finds it again.
        """
        s = dataclasses.replace(self, fixed={k: dict(v) for k, v in self.fixed.items()},
                                forced={k: dict(v) for k, v in self.forced.items()})
        tags = []
        if epochs is not None:
            s.epochs, tags = int(epochs), tags + [f"epochs{epochs}"]
            if "epochs" in s.fixed.get("train", {}):
                s.fixed["train"]["epochs"] = s.epochs
            s.forced.setdefault("train", {})["epochs"] = s.epochs
        if seeds is not None:
            s.seeds, tags = int(seeds), tags + [f"seeds{seeds}"]
        if datasets:
            s.datasets, tags = list(datasets), tags + list(datasets)
        if settings:
            layer = parse_assignments(settings)
            for section, values in layer.items():
                for name in values:
                    if f"{section}.{name}" in {p.key for p in self.search}:
                        raise ConfigError(f"--set: {section}.{name} is searched by study {self.name!r}, not a fixed setting")
            s.fixed, s.forced = lay(s.fixed, layer), lay(s.forced, layer)
            tags += [short_name(item).replace("=", "") for item in settings]  # as typed: d_model64
        if not tags:
            return self
        s.name = re.sub(r"[^A-Za-z0-9_.-]+", "_", "-".join([self.name, *tags]))
        s.validate()
        return s

    def validate(self) -> None:
        where = self.source or self.name
        ptype = self.protocol.get("type") if isinstance(self.protocol, dict) else None
        if ptype not in PROTOCOLS:
            raise ConfigError(f"{where}: protocol.type: {ptype!r} must be one of {PROTOCOLS}")
        if ptype == "few_shot" and self.protocol.get("percent", 10) not in range(1, 101):
            raise ConfigError(f"{where}: protocol.percent: must be an integer in [1, 100]")
        for pair in self.protocol.get("pairs") or []:
            if not (isinstance(pair, list) and len(pair) == 2):
                raise ConfigError(f"{where}: protocol.pairs: {pair!r} is not a [source, target] pair")
        if self.unavailable_vlms not in ("error", "skip"):
            raise ConfigError(f"{where}: unavailable_vlms: {self.unavailable_vlms!r} must be error or skip")
        for ds in self.datasets + [d for pair in self.protocol.get("pairs") or [] for d in pair]:
            if ds not in DATASETS:
                raise ConfigError(f"{where}: datasets: unknown dataset {ds!r}; known: {', '.join(DATASETS.names())}")
        for h in self.horizons:
            if not isinstance(h, int) or h <= 0:
                raise ConfigError(f"{where}: horizons: {h!r} is not a positive integer")
        for section, values in self.fixed.items():
            if not isinstance(values, dict):
                raise ConfigError(f"{where}: fixed.{section}: must be a mapping")
            check_fields(section, values, where=f"{where}: fixed.{section}")
        for p in self.search:
            _setting(p.key, f"{where}: search.{p.key}")
        from timevlm.presets import PRESETS

        if not isinstance(self.variants, dict):
            raise ConfigError(f"{where}: variants: must map variant names to settings")
        presets = [("preset", self.preset)]
        for vname, settings in self.variants.items():
            if not isinstance(settings, dict):
                raise ConfigError(f"{where}: variants.{vname}: must map section.key to a value (or preset: NAME)")
            presets.append((f"variants.{vname}.preset", settings.get("preset")))
            for key in settings:
                if key != "preset":
                    _setting(key, f"{where}: variants.{vname}.{key}")
        for name, preset in presets:
            if preset is not None and preset not in PRESETS:
                raise ConfigError(f"{where}: {name}: unknown preset {preset!r}; known: {', '.join(PRESETS)}")
        if self.variants and any(p.key == VARIANT_KEY for p in self.search):
            raise ConfigError(f"{where}: search.{VARIANT_KEY}: name variants under `variants`, not `search`")
        if self.searcher not in ("optuna", "grid"):
            raise ConfigError(f"{where}: searcher: {self.searcher!r} must be optuna or grid")
        if self.searcher == "grid" and any(p.kind != "grid" for p in self.search):
            raise ConfigError(f"{where}: search: searcher 'grid' takes only 'grid' parameters")
        if self.searcher == "optuna" and any(p.kind == "grid" for p in self.search):
            raise ConfigError(f"{where}: search: 'grid' parameters need `searcher: grid`")
        if self.metric not in METRICS:
            raise ConfigError(f"{where}: metric: {self.metric!r} must be one of {METRICS}")
        if self.mode not in ("min", "max"):
            raise ConfigError(f"{where}: mode: must be min or max")
        if self.trials < 1 or self.epochs < 1:
            raise ConfigError(f"{where}: budget: trials and epochs must be >= 1")
        if self.scheduler.type not in ("asha", "fifo"):
            raise ConfigError(f"{where}: scheduler.type: {self.scheduler.type!r} must be asha or fifo")
        # Every combination of fixed settings with the first value of each searched parameter must be valid.
        first = {p.key: _first_value(p) for p in self.search}
        if self.seeds > 1:
            if self.searcher != "grid":
                raise ConfigError(f"{where}: seeds: repeating over seeds needs `searcher: grid`")
            if any(p.key == "train.seed" for p in self.search):
                raise ConfigError(f"{where}: seeds: train.seed is also searched; use one or the other")
        for cell in self.cells():
            for variant in self.variants or [None]:
                try:
                    self.experiment(cell.dataset, cell.horizon,
                                    {**first, **({VARIANT_KEY: variant} if variant else {})}, cell.test_dataset)
                except ConfigError as e:
                    label = f" (variant {variant!r})" if variant else ""
                    raise ConfigError(f"{where}{label}: {e}") from None


def _setting(key: str, where: str) -> SettingKey:
    try:
        return SettingKey.parse(key)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def _first_value(p: Param) -> Any:
    return p.args["values"][0] if "values" in p.args else p.args["low"]


def _parse_param(key: str, spec: Any, where: str) -> Param:
    if not isinstance(spec, dict) or "type" not in spec:
        raise ConfigError(f"{where}: search.{key}: expected a mapping with 'type' "
                          f"(one of {', '.join(DISTRIBUTIONS)})")
    kind = spec["type"]
    if kind not in DISTRIBUTIONS:
        raise ConfigError(f"{where}: search.{key}.type: unknown distribution {kind!r}; "
                          f"use one of {', '.join(DISTRIBUTIONS)}")
    args = {k: v for k, v in spec.items() if k != "type"}
    missing = [a for a in DISTRIBUTIONS[kind] if a not in args]
    if missing:
        raise ConfigError(f"{where}: search.{key}: '{kind}' needs {', '.join(missing)}")
    extra = sorted(set(args) - set(DISTRIBUTIONS[kind]))
    if extra:
        raise ConfigError(f"{where}: search.{key}: unexpected key(s) {extra} for '{kind}'")
    if "values" in args and (not isinstance(args["values"], list) or not args["values"]):
        raise ConfigError(f"{where}: search.{key}.values: must be a non-empty list")
    if "low" in args:
        if not all(isinstance(args[a], (int, float)) for a in ("low", "high")) or args["low"] >= args["high"]:
            raise ConfigError(f"{where}: search.{key}: low must be a number below high")
        if kind == "loguniform" and args["low"] <= 0:
            raise ConfigError(f"{where}: search.{key}: loguniform needs low > 0")
    return Param(key, kind, args)


def parse_study(data: dict[str, Any], source: str = "") -> StudySpec:
    where = source or "study"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: a study file must be a YAML mapping")
    unknown = sorted(set(data) - TOP_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {', '.join(sorted(TOP_KEYS))}")
    if "name" not in data:
        raise ConfigError(f"{where}: missing key 'name'")
    budget = data.get("budget") or {}
    if set(budget) - {"trials", "epochs"}:
        raise ConfigError(f"{where}: budget: unknown key(s) {sorted(set(budget) - {'trials', 'epochs'})}")

    def sub(cls, key):
        values = data.get(key) or {}
        known = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(values) - known)
        if bad:
            raise ConfigError(f"{where}: {key}: unknown key(s) {bad}; known: {', '.join(sorted(known))}")
        return cls(**values)

    # only what the file says: every default is StudySpec's own
    given = {k: data[k] for k in ("description", "searcher", "metric", "mode", "preset", "unavailable_vlms")
             if data.get(k) is not None}
    given.update({k: list(data[k]) for k in ("datasets", "horizons") if data.get(k) is not None})
    given.update({k: int(data[k]) for k in ("seed", "seeds") if data.get(k) is not None})
    given.update({k: int(budget[k]) for k in ("trials", "epochs") if k in budget})
    given.update({k: data[k] for k in ("fixed", "smoke", "protocol", "variants") if data.get(k)})
    spec = StudySpec(name=str(data["name"]), resources=sub(Resources, "resources"),
                     scheduler=sub(Scheduler, "scheduler"), source=source,
                     search=[_parse_param(k, v, where) for k, v in (data.get("search") or {}).items()], **given)
    spec.validate()
    return spec


def load_study(name_or_path: str) -> StudySpec:
    """A study by name (search_spaces/NAME.yaml) or by path to a YAML file."""
    path = Path(name_or_path)
    if not path.suffix:
        path = SEARCH_SPACES_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in SEARCH_SPACES_DIR.glob("*.yaml"))
        raise ConfigError(f"study {name_or_path!r} not found ({path}); known studies: {', '.join(known)}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from e
    return parse_study(data, str(path))
