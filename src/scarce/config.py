"""Run configuration: frozen dataclasses loaded from YAML, overridable from the CLI.

:class:`EngineConfig` holds what the training engine reads for any task (steps, time budget,
evaluation interval, early stopping, mixed precision, device, optimiser); a task's config
extends it with one dataclass per concern (:class:`TrainConfig` for segmentation). Every field
has a comment with its meaning and unit. Unknown YAML keys are errors (a typo must never fall
back to a default silently). The allowed values of every choice live only in :data:`CHOICES`.
The resolved config is saved in the run folder and in every checkpoint. Presets ship with the
package (``scarce/configs/*.yaml``), found by name: ``load_config("default")``, ``--config``.
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from scarce import atomic
from scarce.errors import ConfigError

# The allowed values of every config choice, by dotted key; modules that check a value import
# their tuple from here (e.g. the losses take CHOICES["loss.name"]).
CHOICES: dict[str, tuple] = {
    "amp": ("auto", "off", "bf16", "fp16"),
    "data.normalization": ("zscore", "percentile", "robust", "dataset"),
    "data.target": ("auto", "class", "semantic", "boundary"),
    "augment.interpolation": ("linear", "cubic"),
    "model.norm": ("batch", "group", "instance", "none"),
    "model.upsampling": ("transpose", "bilinear"),
    "loss.name": ("ce", "dice", "dice_ce"),
    "loss.class_weights": (None, "inverse_frequency"),
    "optim.schedule": ("cosine", "plateau", "constant"),
    "predict.blend": ("gaussian", "constant"),
    "loss.smoothness": ("lap", "jacob", "cjacob", "tv", "rigidity"),  # alignment
}
AMP_MODES = CHOICES["amp"]  # TrainConfig.amp; resolved by scarce.engine.distributed.resolve_amp


@dataclass(frozen=True)
class DataConfig:
    """How readers draw and prepare training patches."""

    patch_size: int = 256  # side of the square training patch, pixels (multiple of 2**depth)
    batch_size: int = 8  # patches per step and per process (DDP global batch = K x this)
    reader_count: int = -1  # workers per device; 0 = in the trainer; -1 = auto: cores // 2 in 1..8
    prefetch_batches: int = 4  # batches each worker keeps ready in the queue
    balance_classes: bool = False  # sample a class uniformly, then a patch centred on it
    normalization: str = "zscore"  # zscore | percentile | robust (per image) | dataset
    percentiles: tuple[float, float] = (1.0, 99.8)  # low/high percentile: percentile, robust
    floor_fraction: float = 0.25  # robust: scale >= this x training median SNR x noise sigma
    target: str = "auto"  # auto | class | semantic | boundary: how masks become class maps
    boundary_width: int = 2  # boundary thickness for target "boundary", pixels
    ignore_label: int | None = None  # mask value that marks unlabelled pixels (skipped)
    starvation_ms: float = 50.0  # a batch wait above this logs "Input queue starvation", ms
    test_tile_size: int = 512  # test images larger than this are evaluated in tiles, pixels
    downscale: float = 1.0  # shrink images by this factor for training, evaluation and
    # prediction (2 = half the pixels per side); recorded in checkpoints, undone at predict


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentation: one random draw per sample, the same geometry for image and mask.

    Defaults in brackets in the issue come from the NIST system this replaces."""

    enabled: bool = True  # master switch (--no-augment turns it off)
    interpolation: str = "linear"  # image resampling: linear | cubic (mask: always nearest)
    flip_x_p: float = 0.5  # probability of reflecting about the vertical axis
    flip_y_p: float = 0.5  # probability of reflecting about the horizontal axis
    rotation: bool = True  # random rotation about the patch centre
    rotation_p: float = 1.0  # probability of rotating
    rotation_degrees: tuple[float, float] = (0.0, 360.0)  # uniform angle range, degrees
    jitter: bool = True  # random translation
    jitter_p: float = 1.0  # probability of translating
    jitter_fraction: float = 0.1  # max shift as a fraction of the patch side (x and y)
    scale: bool = True  # random anisotropic scaling about the centre
    scale_p: float = 1.0  # probability of scaling
    scale_fraction: float = 0.1  # max relative change of each axis, e.g. 0.1 = 0.9..1.1
    elastic: bool = False  # U-Net elastic deformation (coarse random grid, smooth)
    elastic_p: float = 1.0  # probability of deforming
    elastic_grid: int = 3  # coarse grid points per axis
    elastic_sigma: float = 10.0  # std of grid displacements, pixels
    noise: bool = True  # additive Gaussian noise
    noise_p: float = 0.5  # probability of adding noise
    noise_fraction: float = 0.02  # noise std as a fraction of the patch's dynamic range
    blur: bool = True  # Gaussian blur, per channel
    blur_p: float = 0.5  # probability of blurring
    blur_max_sigma: float = 2.0  # sigma drawn uniformly in [0, max], pixels
    intensity: bool = False  # random offset and gain
    intensity_p: float = 0.5  # probability of changing intensity
    intensity_fraction: float = 0.05  # max offset / gain change, fraction of dynamic range
    gamma: bool = False  # random gamma on the range-normalised image
    gamma_p: float = 0.3  # probability of applying gamma
    gamma_range: tuple[float, float] = (0.7, 1.5)  # uniform gamma range
    cutout_missing: bool = False  # SEAMLeSS missing-data patches (constant fill)
    cutout_contrast: bool = False  # SEAMLeSS contrast cutouts (region x or / by U(1, 2))
    cutout_noise: bool = False  # SEAMLeSS noise cutouts (region replaced by noise)
    cutout_p: float = 0.3  # probability of each enabled cutout kind
    cutout_max_fraction: float = 0.25  # max cutout side as a fraction of the patch side
    empty_field_p: float = 0.0  # probability a patch is a synthetic empty field (data/empty.py)

    def __post_init__(self) -> None:
        _check_augment(self)


def _check_augment(cfg: AugmentConfig) -> None:
    """Validate the value ranges of an augmentation config.

    Raises
    ------
    ConfigError
        Naming every ``augment.<key>`` outside its valid range, and that range.
    """
    switches = [f.name for f in fields(cfg) if f.name.endswith("_p")]
    problems = [
        f"augment.{k} = {getattr(cfg, k)} must be in [0, 1]"
        for k in switches
        if not 0.0 <= getattr(cfg, k) <= 1.0
    ]
    lo, hi = cfg.rotation_degrees
    g_lo, g_hi = cfg.gamma_range
    checks = [
        (lo <= hi, f"augment.rotation_degrees = {cfg.rotation_degrees} needs low <= high"),
        (cfg.jitter_fraction >= 0, "augment.jitter_fraction must be >= 0"),
        (0 <= cfg.scale_fraction < 1, "augment.scale_fraction must be in [0, 1)"),
        (cfg.elastic_grid >= 2, "augment.elastic_grid must be >= 2 grid points per axis"),
        (cfg.elastic_sigma >= 0, "augment.elastic_sigma must be >= 0 pixels"),
        (cfg.noise_fraction >= 0, "augment.noise_fraction must be >= 0"),
        (cfg.blur_max_sigma >= 0, "augment.blur_max_sigma must be >= 0 pixels"),
        (0 <= cfg.intensity_fraction < 1, "augment.intensity_fraction must be in [0, 1)"),
        (0 < g_lo <= g_hi, f"augment.gamma_range = {cfg.gamma_range} needs 0 < low <= high"),
        (0 < cfg.cutout_max_fraction <= 1, "augment.cutout_max_fraction must be in (0, 1]"),
    ]
    problems += [message for ok, message in checks if not ok]
    if problems:
        raise ConfigError("; ".join(problems) + " (fix the augment section of the config)")


@dataclass(frozen=True)
class ModelConfig:
    """Network architecture; in/out channels come from the database metadata."""

    name: str = "unet"  # key of scarce.models.MODELS: unet | segnet
    depth: int = 4  # number of poolings (U-Net) / encoder stages (SegNet)
    width: int = 32  # channels of the first stage; doubles per stage (64 = U-Net paper)
    widths: tuple[int, ...] | None = None  # U-Net channels per level (depth + 1), overrides width
    norm: str = "batch"  # batch | group | instance | none
    dropout: float = 0.0  # dropout probability at the bottleneck
    upsampling: str = "transpose"  # transpose | bilinear (U-Net decoder)


@dataclass(frozen=True)
class LossConfig:
    """Loss on logits (N, K, H, W) against class maps (N, H, W)."""

    name: str = "dice_ce"  # ce | dice | dice_ce (nnU-Net default)
    class_weights: str | None = None  # None | inverse_frequency (from metadata pixel counts)
    border_weights: bool = False  # U-Net paper border weight map (instance masks only)
    border_w0: float = 10.0  # w0 of the border weight map
    border_sigma: float = 5.0  # sigma of the border weight map, pixels


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with warm-up, then a cosine or plateau schedule."""

    learning_rate: float = 3e-4  # peak learning rate
    weight_decay: float = 1e-4  # AdamW decoupled weight decay
    warmup_steps: int = 50  # linear warm-up from 0 to the peak, steps
    schedule: str = "cosine"  # cosine (to min_lr at max_steps) | plateau | constant
    min_lr_fraction: float = 0.01  # cosine floor as a fraction of the peak
    plateau_patience: int = 3  # evaluations without improvement before "plateau" cuts the lr
    plateau_factor: float = 0.5  # lr multiplier on a plateau
    grad_clip: float = 1.0  # max global gradient norm; 0 disables


@dataclass(frozen=True)
class PredictConfig:
    """Defaults for sliding-window prediction and instance post-processing."""

    tile_size: int = 0  # sliding-window tile side, pixels; 0 = twice the patch size
    overlap: float = 0.5  # fraction of the tile shared by neighbouring tiles
    blend: str = "gaussian"  # gaussian (nnU-Net, sigma = tile/8) | constant
    tta: bool = False  # average over flips and 90-degree rotations
    batch_size: int = 4  # tiles per forward pass
    min_object_size: int = 16  # instances smaller than this are removed, pixels
    min_object_score: float = 0.0  # instances whose mean foreground probability is below go


@dataclass(frozen=True)
class EngineConfig:
    """What the training engine reads for any task; task configs extend it.

    A task's config also has a ``data`` section with ``starvation_ms`` (the engine's
    input-queue monitor threshold).
    """

    seed: int = 0  # seeds model init, reader generators and everything random
    max_steps: int = 2000  # stop after this many optimiser steps
    max_minutes: float | None = None  # stop after this much wall time, minutes
    test_every_n_steps: int = 200  # evaluate on the whole test database every N steps
    early_stopping: int = 10  # stop after N evaluations without a better test loss; 0 = off
    log_every_n_steps: int = 10  # train-loss log and progress-bar refresh interval, steps
    amp: str = "auto"  # auto | off | bf16 (CPU and CUDA) | fp16 (CUDA, with a gradient scaler);
    # auto = bf16 on GPUs and CPUs with bf16 instructions, fp16 on older GPUs, else off
    channels_last: bool = False  # NHWC memory format (helps on GPUs with tensor cores)
    compile: bool = False  # torch.compile the model
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = 0  # torch intra-op threads per process; 0 = torch default
    grad_accumulation: int = 1  # micro-batches per step (batch split, global batch kept)
    plot_test_images: int = 4  # test examples drawn in plots/step_XXXXX.png
    optim: OptimConfig = field(default_factory=OptimConfig)

    def __post_init__(self) -> None:
        check_choices(self)
        if self.test_every_n_steps < 1:
            raise ConfigError("test_every_n_steps must be >= 1")
        if self.grad_accumulation < 1:
            raise ConfigError(f"grad_accumulation = {self.grad_accumulation} must be >= 1")


@dataclass(frozen=True)
class TrainConfig(EngineConfig):
    """Everything a segmentation training run needs besides the databases and the run folder."""

    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_segmentation(self)


def check_choices(cfg) -> None:
    """Raise :class:`ConfigError` for a value outside :data:`CHOICES` (keys ``cfg`` lacks skip)."""
    for dotted, allowed in CHOICES.items():
        obj, parts = cfg, dotted.split(".")
        for part in parts:
            if not hasattr(obj, part):
                break
            obj = getattr(obj, part)
        else:
            if obj not in allowed:
                raise ConfigError(f"{dotted} = {obj!r} is not one of {list(allowed)}")


def _check_segmentation(cfg: TrainConfig) -> None:
    if cfg.data.patch_size < 8:
        raise ConfigError(f"data.patch_size = {cfg.data.patch_size} is too small (>= 8)")
    if cfg.data.batch_size < 1:
        raise ConfigError(f"data.batch_size = {cfg.data.batch_size} must be >= 1")
    if cfg.data.batch_size < cfg.grad_accumulation or not 0.1 <= cfg.data.downscale <= 16:
        raise ConfigError(
            f"data.batch_size = {cfg.data.batch_size} must be >= grad_accumulation = "
            f"{cfg.grad_accumulation}, and data.downscale = {cfg.data.downscale} in [0.1, 16]"
        )
    if not 0.0 <= cfg.predict.overlap < 1.0:
        raise ConfigError(f"predict.overlap = {cfg.predict.overlap} must be in [0, 1)")
    if not 0.0 <= cfg.predict.min_object_score <= 1.0:
        raise ConfigError(f"predict.min_object_score {cfg.predict.min_object_score} not in [0, 1]")


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Convert a YAML value to the field's type (tuples from lists, ints to floats)."""
    hint = annotation
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _coerce(value, non_none[0], where)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:  # tuple[int, ...]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return tuple(_coerce(v, args[0], where) for v in value)
    if origin is tuple:
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise ConfigError(f"{where}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, where) for v, a in zip(value, args))
    if hint in _SCALARS:
        if hint is str and isinstance(value, bool):  # YAML 1.1 reads unquoted off as false
            return "on" if value else "off"
        accepted, what = _SCALARS[hint]
        if (isinstance(value, bool) and hint is not bool) or not isinstance(value, accepted):
            raise ConfigError(f"{where}: expected {what}, got {value!r}")
        return float(value) if hint is float else value
    return value


_SCALARS = {
    bool: (bool, "true/false"),
    int: (int, "an integer"),
    float: (int | float, "a number"),
    str: (str, "a string"),
}


def _from_dict(cls: type, data: dict, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(
            f"{where or 'config'}: unknown key(s) {unknown}; valid keys are {sorted(known)}"
        )
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        key = f"{where}.{name}" if where else name
        if is_dataclass(hint):
            kwargs[name] = _from_dict(hint, value or {}, key)
        else:
            kwargs[name] = _coerce(value, hint, key)
    return cls(**kwargs)


def config_from_dict(data: dict | None, cls: type = None) -> Any:
    """Build a config (default :class:`TrainConfig`) from nested plain values (as in YAML).

    Missing keys take their defaults.

    Parameters
    ----------
    data : dict or None
        Nested plain values.
    cls : type, optional
        The config dataclass to build (:class:`TrainConfig` when omitted).

    Raises
    ------
    ConfigError
        On an unknown key, a value of the wrong type or a value outside its choices.
    """
    return _from_dict(cls or TrainConfig, data or {}, "")


def config_to_dict(cfg) -> dict:
    """Nested plain values (lists for tuples) suitable for YAML, JSON and checkpoints."""

    def plain(v: Any) -> Any:
        if is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in fields(v)}
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        return v

    return plain(cfg)


def preset_names() -> list[str]:
    """Names of the presets shipped with Scarce (``scarce/configs/NAME.yaml``), sorted."""
    folder = resources.files("scarce") / "configs"
    return sorted(f.name[: -len(".yaml")] for f in folder.iterdir() if f.name.endswith(".yaml"))


def read_preset(name: str) -> str:
    """The YAML text of the preset ``name`` (with or without ``.yaml``).

    Raises
    ------
    ConfigError
        If no preset has that name (the message lists them).
    """
    stem = name[: -len(".yaml")] if name.endswith(".yaml") else name
    file = resources.files("scarce") / "configs" / f"{stem}.yaml"
    if not file.is_file():
        raise ConfigError(
            f"config {name!r} is neither a file nor a preset; presets: {', '.join(preset_names())}"
        )
    return file.read_text()


def load_config(path: str | Path | None, cls: type = None) -> Any:
    """Read a YAML config file or a preset by name; ``None`` gives the defaults.

    Parameters
    ----------
    path : path-like or str or None
        A YAML file, or the name of a preset shipped with Scarce (``default``,
        ``quick-cpu``, ...; see :func:`preset_names`). An existing file wins over a preset.
    cls : type, optional
        The config dataclass (:class:`TrainConfig` when omitted).

    Raises
    ------
    ConfigError
        If the file or preset is missing, is not valid YAML, or has unknown keys or bad values
        (the message names the file).
    """
    cls = cls or TrainConfig
    if path is None:
        return cls()
    file = Path(path)
    if file.is_file():
        where, text = str(file), file.read_text()
    elif file.suffix in ("", ".yaml") and file.parent == Path("."):
        where, text = f"preset {file.stem}", read_preset(str(path))
    else:
        raise ConfigError(f"config file {file} does not exist")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        problem = " ".join(str(exc).split())  # one line; python/* tags are refused here
        raise ConfigError(f"{where}: not valid YAML: {problem}") from exc
    try:
        return config_from_dict(data, cls)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def save_config(cfg, path: str | Path) -> None:
    """Write ``cfg`` as YAML to ``path`` atomically (:func:`scarce.atomic.write_text`)."""
    atomic.write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def override(cfg, assignments: dict[str, Any]):
    """Return a copy of ``cfg`` with dotted keys replaced, e.g. ``{"data.batch_size": 4}``.

    Values may be Python values or YAML strings (``"4"``, ``"[1, 99]"``, ``"true"``).

    Raises
    ------
    ConfigError
        On an unknown key or a bad value.
    """
    data = config_to_dict(cfg)
    for dotted, value in assignments.items():
        if isinstance(value, str):
            value = yaml.safe_load(value) if value != "" else value
        node = data
        parts = dotted.split(".")
        for part in parts[:-1]:
            if part not in node or not isinstance(node[part], dict):
                raise ConfigError(f"unknown config section {part!r} in {dotted!r}")
            node = node[part]
        if parts[-1] not in node:
            raise ConfigError(f"unknown config key {dotted!r}")
        node[parts[-1]] = value
    return config_from_dict(data, type(cfg))
