"""Typed configs with the paper's defaults (Time-VLM, ICML 2025), validated on construction."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from timevlm.errors import ConfigError

VLM_VARIANTS = ("custom", "clip", "vilt", "blip2")
INSTANCE_NORMS = ("revin", "none")  # timevlm/model/normalization.py
MODEL_KINDS = ("timevlm", "dlinear", "patchtst")  # MODEL_DEFAULTS below holds what `auto` means for each
FEW_SHOT_CUTS = ("random", "first")  # timevlm/data/windows.py


# Field metadata of the settings that say where and how a run executes on this machine (files, cache, device,
# threads, console), not what is trained: they never change a result, are never logged as parameters
# (ExperimentConfig.params), and a platform sets them for its machines through RunEnv (ExperimentConfig.placed).
ENV = {"env": True}


AUTO = "auto"


@dataclass(frozen=True)
class ModelDefaults:
    """What `auto` means for one model: the settings each model keeps from its own paper or from our
    measurements, written into an experiment when it is resolved (ExperimentConfig), so MLflow logs what ran."""

    # per-window instance normalisation (model.instance_norm): Time-VLM and PatchTST normalise each window
    # (RevIN), DLinear maps the raw window, as their papers do
    instance_norm: str
    # weight averaging (train.ema_decay), chosen on validation MSE, the only selector: offered to every model in
    # the same runs, it lowered the validation MSE of Time-VLM and PatchTST wherever measured and raised
    # DLinear's (a linear map without dropout has little step-to-step noise to average away)
    ema_decay: float | None
    # the forecast's loss (train.forecast_loss): MSE + MAE (the authors' masked-visual-modelling objective) for
    # Time-VLM, whose validation-selected test MSE it lowered by 0.5% on the mean of few-shot ETTh1, ETTm1,
    # Weather and full-data ETTh1 (reports/accuracy/forecast_loss.csv); the baselines keep the MSE their papers
    # train with (and the paper's baseline rows were trained with)
    forecast_loss: str


MODEL_DEFAULTS: dict[str, ModelDefaults] = {
    "timevlm": ModelDefaults(instance_norm="revin", ema_decay=0.999, forecast_loss="mse+mae"),
    "dlinear": ModelDefaults(instance_norm="none", ema_decay=None, forecast_loss="mse"),
    "patchtst": ModelDefaults(instance_norm="revin", ema_decay=0.999, forecast_loss="mse"),
}


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass
class ModelConfig:
    """Architecture settings. Defaults follow the paper (DESIGN.md section 5)."""

    seq_len: int = 512
    pred_len: int = 96
    n_vars: int | None = None  # None: taken from the dataset
    periodicity: int | None = None  # None: the dataset's period (24 ETTh, 96 ETTm, 144 Weather)
    # RAL: retrieval-augmented (temporal memory) learner
    d_model: int = 128
    patch_len: int = 16
    stride: int = 8
    padding: int = 8
    n_heads: int = 4
    memory_size: int = 32
    memory_momentum: float = 0.9
    ral_out_norm: bool = True  # a LayerNorm on every patch embedding before the flatten head
    head_dim: int | None = None  # None: flatten d_model per patch; else project each patch to head_dim first
    memory_gate: bool = False  # a learned sigmoid gate on what the memory retrieves (official: per setting)
    # the temporal forecast = a linear map of the normalised window (DLinear's decomposition and two linear maps,
    # starting as the window's mean; a global linear residual as in TiDE) + the patch-memory flatten head as a residual on it, which starts at
    # zero and which validation keeps only where it lowers the error (training.validate). False: the flatten
    # head alone, as in the official code
    linear_skip: bool = True
    # training only: the probability that a window's patch-head residual is dropped (per window and variable),
    # so the linear map also learns to forecast alone and validation can close the head where it overfits
    head_drop: float = 0.5
    dropout: float = 0.1
    # VAL: series -> 3-channel image
    image_size: int = 64
    top_k_freqs: int = 5
    # TAL: series -> prompt
    max_prompt_tokens: int = 48  # the statistics and task take <= 43 tokens; the rest starts the description
    dataset_name: str = ""
    dataset_description: str = ""
    # the dataset's description at the end of every prompt. Off by default: it is the same for every window of
    # a dataset, so a model trained on one dataset learns nothing from it, and at 48 tokens only its first
    # 5-7 words fitted (12% of the text encoder's work in the feature build). On where one model sees several
    # datasets and the description is what tells them apart.
    prompt_description: bool = False
    # frozen VLM
    vlm: str = "custom"
    vlm_path: str | None = None  # hub id or local dir for clip/vilt/blip2
    vlm_input_size: int | None = None  # None: the adapter's native input (custom: image_size)
    # dynamic int8 quantisation of the text encoder's linear layers (custom VLM; runs on CPU): a faster feature
    # build whose features differ slightly, so it is part of the feature-cache key
    vlm_int8: bool = False
    vision_tokens: int = 4
    # fusion + predictor
    d_fusion: int = 256
    mm_dropout: float = 0.3  # dropout on the projected VLM tokens and before the correction head
    norm_const: float = 0.4
    # per-window instance normalisation: "revin" (each window's mean and std out, back into the forecast) or
    # "none" (the raw window); auto: the model's published choice (MODEL_DEFAULTS). reports/accuracy: none
    # helps Time-VLM on ETTh1 5% at H 96 and hurts it on ETTm1 10% at H 720
    instance_norm: Literal["revin", "none", "auto"] = AUTO
    # ablations: each switch removes the branch from the forward pass
    use_ral: bool = True
    use_val: bool = True
    use_tal: bool = True
    model: Literal["timevlm", "dlinear", "patchtst"] = "timevlm"

    def __post_init__(self) -> None:
        _require(self.model in MODEL_KINDS, f"model must be one of {MODEL_KINDS}, got {self.model!r}")
        _require(self.vlm in VLM_VARIANTS, f"unknown VLM {self.vlm!r}; known: {', '.join(VLM_VARIANTS)}")
        for name in ("vlm_int8", "prompt_description"):
            _require(isinstance(getattr(self, name), bool), f"{name} must be true or false, got {getattr(self, name)!r}")
        _require(not self.vlm_int8 or self.vlm == "custom",
                 f"vlm_int8 quantises the custom VLM's text encoder; vlm={self.vlm!r} does not support it")
        for name in ("seq_len", "pred_len", "d_model", "patch_len", "stride",
                     "n_heads", "memory_size", "image_size", "d_fusion", "vision_tokens",
                     "max_prompt_tokens", "top_k_freqs"):
            v = getattr(self, name)
            _require(isinstance(v, int) and not isinstance(v, bool) and v > 0,
                     f"{name} must be a positive integer, got {v!r}")
        for name in ("n_vars", "periodicity", "head_dim"):
            v = getattr(self, name)
            _require(v is None or (isinstance(v, int) and v > 0), f"{name} must be a positive integer, got {v!r}")
        _require(self.padding >= 0, f"padding must be >= 0, got {self.padding}")
        _require(self.seq_len > self.patch_len,
                 f"seq_len ({self.seq_len}) must be greater than patch_len ({self.patch_len})")
        _require(self.d_model % self.n_heads == 0,
                 f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        _require(self.d_fusion % self.n_heads == 0,
                 f"d_fusion ({self.d_fusion}) must be divisible by n_heads ({self.n_heads})")
        _require(0.0 < float(self.norm_const) <= 10.0, f"norm_const must be in (0, 10], got {self.norm_const}")
        if self.instance_norm is None:  # what a model saved before `auto` existed carries for it
            self.instance_norm = AUTO
        _require(self.instance_norm in (*INSTANCE_NORMS, AUTO),
                 f"instance_norm must be {', '.join(INSTANCE_NORMS)} or auto, got {self.instance_norm!r}")
        _require(isinstance(self.linear_skip, bool), f"linear_skip must be true or false, got {self.linear_skip!r}")
        _require(self.linear_skip or self.head_drop == 0.0,
                 f"head_drop ({self.head_drop}) drops the head's residual on the linear map: it needs linear_skip")
        for name in ("dropout", "mm_dropout", "head_drop"):
            v = getattr(self, name)
            _require(0.0 <= v < 1.0, f"{name} must be in [0, 1), got {v}")
        _require(0.0 <= self.memory_momentum < 1.0, "memory_momentum must be in [0, 1)")
        _require(self.image_size >= 8, f"image_size must be >= 8, got {self.image_size}")
        _require(self.use_ral or self.use_val or self.use_tal,
                 "at least one of use_ral, use_val, use_tal must be enabled")

    def resolved(self) -> "ModelConfig":
        """This config with `auto` settings replaced by the model's own (MODEL_DEFAULTS)."""
        if self.instance_norm != AUTO:
            return self
        return dataclasses.replace(self, instance_norm=MODEL_DEFAULTS[self.model].instance_norm)

    @property
    def num_patches(self) -> int:
        return (self.seq_len + self.padding - self.patch_len) // self.stride + 1


@dataclass
class DataConfig:
    dataset: str = "ETTh1"
    data_dir: str | None = field(default=None, metadata=ENV)  # None: $TIMEVLM_DATA_DIR, then ../shared/data
    percent: int = 100  # few-shot: train on percent% of the training windows, chosen by `few_shot`
    # which windows a few-shot run keeps: "random", the official Time-VLM code's protocol (int(n * percent / 100)
    # windows drawn with train.seed from all training windows), or "first", Time-LLM's and OFA's (the windows of
    # the first percent% of the training rows; what the paper's DLinear/PatchTST rows used). The scaler is fit
    # on the whole training split under both
    few_shot: Literal["random", "first"] = "random"
    test_dataset: str | None = None  # zero-shot: evaluate on another dataset's test split
    max_windows: int | None = None  # smoke runs only: cap windows per split (evenly spaced)

    def __post_init__(self) -> None:
        _require(isinstance(self.percent, int) and 1 <= self.percent <= 100,
                 f"percent must be an integer in [1, 100], got {self.percent!r}")
        _require(self.few_shot in FEW_SHOT_CUTS,
                 f"few_shot must be {' or '.join(FEW_SHOT_CUTS)}, got {self.few_shot!r}")
        _require(self.max_windows is None or self.max_windows > 0, "max_windows must be positive")


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    patience: int = 3
    lr_schedule: Literal["cosine", "halving", "constant"] = "cosine"
    seed: int = 2021
    # bf16 autocast, CUDA only; off by default, since it did not speed up our launch-bound batch-32 step on an
    # H200 (benchmarks/step_speed.py, reports/speed)
    amp: bool = False
    device: str = field(default="auto", metadata=ENV)
    num_threads: int | None = field(default=None, metadata=ENV)
    grad_clip: float | None = 1.0
    # the forecast's loss; "mse+mae" is the authors' masked-visual-modelling objective (timevlm.losses.forecast);
    # auto: the model's own (MODEL_DEFAULTS)
    forecast_loss: Literal["mse", "mse+mae", "auto"] = AUTO
    # Time-VLM's alignment losses on the projected vision and text tokens, added at these weights (0: off):
    # image-text matching (timevlm.losses.itm) and word-patch alignment by optimal transport (timevlm.losses.wpa)
    itm_weight: float = 0.0
    wpa_weight: float = 0.0
    # a control, not a model setting: pair every window with another window's VLM features (vision and text
    # together; a fixed permutation per split drawn from the seed). What a model still gains with it on does not
    # come from what the features say about their own window (timevlm.features.SplitFeatures.shuffled)
    shuffle_features: bool = False
    # an exponential moving average of the weights, updated after every step with this decay (None: off); it is
    # what validation scores, what early stopping keeps and what the test sees (torch.optim.swa_utils).
    # auto: the model's own setting (MODEL_DEFAULTS)
    ema_decay: float | Literal["auto"] | None = AUTO
    # the VLM features from the cache (computed once per key) or by an encoder attached to the model at every step
    use_feature_cache: bool = field(default=True, metadata=ENV)
    cache_dir: str | None = field(default=None, metadata=ENV)  # None: timevlm.features.resolve_cache_root
    # an unwritable cache: fail naming it, or compute in memory
    cache_fallback: Literal["error", "memory"] = field(default="error", metadata=ENV)
    progress: bool = field(default=True, metadata=ENV)

    def resolved(self, model: str) -> "TrainConfig":
        """This config with `auto` settings replaced by `model`'s own (MODEL_DEFAULTS)."""
        own = MODEL_DEFAULTS[model]
        return dataclasses.replace(self, **{name: getattr(own, name) for name in ("ema_decay", "forecast_loss")
                                            if getattr(self, name) == AUTO})

    @property
    def is_resolved(self) -> bool:
        return AUTO not in (self.ema_decay, self.forecast_loss)

    def __post_init__(self) -> None:
        _require(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        _require(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        _require(0 < self.lr < 1, f"lr must be in (0, 1), got {self.lr}")
        _require(self.patience >= 1, f"patience must be >= 1, got {self.patience}")
        _require(self.ema_decay in (None, "auto") or (isinstance(self.ema_decay, (int, float))
                                                        and 0 < self.ema_decay < 1),
                 f"ema_decay must be in (0, 1), auto or null, got {self.ema_decay!r}")
        _require(self.cache_fallback in ("error", "memory"),
                 f"cache_fallback must be error or memory, got {self.cache_fallback!r}")
        _require(self.forecast_loss in ("mse", "mse+mae", AUTO),
                 f"forecast_loss must be mse, mse+mae or auto, got {self.forecast_loss!r}")
        _require(self.itm_weight >= 0 and self.wpa_weight >= 0,
                 f"itm_weight and wpa_weight must be >= 0, got {self.itm_weight} and {self.wpa_weight}")
        _require(self.use_feature_cache or not self.shuffle_features,
                 "shuffle_features permutes the cached features: it needs use_feature_cache")
        _require(self.lr_schedule in ("cosine", "halving", "constant"),
                 f"lr_schedule must be cosine, halving or constant, got {self.lr_schedule!r}")


@dataclass(frozen=True)
class RunEnv:
    """Where and how a run executes on this machine (the ENV settings): what a platform sets for its nodes,
    apart from the experiment it was given. None keeps the experiment's own value."""

    data_dir: str | None = None
    cache_dir: str | None = None
    device: str | None = None
    num_threads: int | None = None
    progress: bool | None = None
    use_feature_cache: bool | None = None
    cache_fallback: str | None = None


@dataclass
class ExperimentConfig:
    """Everything one training run needs; what a Tune trial hands to its workers. Resolved on construction,
    once: what the dataset decides (n_vars, period, the prompt's name and description) and `auto` values are
    written in, so every reader (the model, the feature cache's key, MLflow's parameters) sees the same numbers:
    the only place `auto` settings are resolved."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        from timevlm.data.registry import get_dataset  # the data package imports this module

        spec, m = get_dataset(self.data.dataset), self.model
        self.model = dataclasses.replace(
            m, n_vars=m.n_vars or spec.n_vars, periodicity=m.periodicity or spec.periodicity,
            dataset_name=m.dataset_name or spec.name, dataset_description=m.dataset_description or spec.description)
        self.model = self.model.resolved()
        self.train = self.train.resolved(self.model.model)

    def placed(self, env: RunEnv) -> "ExperimentConfig":
        """This experiment with `env`'s settings (those it sets) for where and how it runs."""
        values = {k: v for k, v in dataclasses.asdict(env).items() if v is not None}
        return dataclasses.replace(self, **{
            sec: dataclasses.replace(getattr(self, sec), **{f.name: values[f.name]
                                                            for f in dataclasses.fields(getattr(self, sec))
                                                            if f.metadata.get("env") and f.name in values})
            for sec in ("data", "train")})

    def params(self) -> dict[str, Any]:
        """What was trained, `section.key -> value` (flat() without the ENV settings): MLflow's parameters."""
        env = {f"{sec}.{f.name}" for sec in ("model", "data", "train")
               for f in dataclasses.fields(getattr(self, sec)) if f.metadata.get("env")}
        return {k: v for k, v in self.flat().items() if k not in env}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def portable_dict(self) -> dict[str, Any]:
        """to_dict() without the ENV settings (this machine's paths, device, threads): what a saved model
        carries, so that it names no machine and loads anywhere with that machine's own defaults."""
        return {sec: {f.name: getattr(getattr(self, sec), f.name) for f in dataclasses.fields(getattr(self, sec))
                      if not f.metadata.get("env")} for sec in ("model", "data", "train")}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ExperimentConfig":
        unknown = sorted(set(d) - {"model", "data", "train"})
        if unknown:
            raise ConfigError(f"unknown section(s) {', '.join(map(str, unknown))}; use model, data, train")
        return cls(
            model=_build(ModelConfig, d.get("model", {}), "model"),
            data=_build(DataConfig, d.get("data", {}), "data"),
            train=_build(TrainConfig, d.get("train", {}), "train"),
        )

    def flat(self) -> dict[str, Any]:
        """`section.key -> value`, the form logged to MLflow as params."""
        return {f"{sec}.{k}": v for sec, vals in self.to_dict().items() for k, v in vals.items()}


SECTIONS: dict[str, type] = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}


def check_fields(section: str, names: Any, where: str = "") -> None:
    """The one check that `names` are fields of `section` (model, data or train): a ConfigError naming the unknown
    ones, and the known, otherwise. `where` says where they were written (a file, a key)."""
    prefix = f"{where}: " if where else ""
    if section not in SECTIONS:
        raise ConfigError(f"{prefix}unknown section {section!r}; use {', '.join(SECTIONS)}")
    known = {f.name for f in dataclasses.fields(SECTIONS[section])}
    unknown = sorted(set(names) - known)
    if unknown:
        raise ConfigError(f"{prefix}unknown setting(s) in '{section}': {', '.join(unknown)}; "
                          f"known: {', '.join(sorted(known))}")


def _build(cls: type, values: dict[str, Any], section: str):
    check_fields(section, values)
    return cls(**values)
