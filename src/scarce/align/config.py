"""Configuration of an alignment run: :class:`AlignConfig` extends the engine's config.

One dataclass per concern, as for segmentation: which pairs and patches the readers draw
(:class:`AlignDataConfig`), the augmentation applied to the data and to the network input only
(:class:`AlignAugmentConfig`), the field network (:class:`FieldNetConfig`), the loss
(:class:`AlignLossConfig`) and how training is staged and evaluated (:class:`StageConfig`).
Allowed values of the choices live in :data:`scarce.config.CHOICES`. Load with
``load_config("align-em", AlignConfig)`` (the ``align-em`` preset ships with the package).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from scarce.config import CHOICES, ConfigError, EngineConfig, OptimConfig

SMOOTHNESS = CHOICES["loss.smoothness"]


@dataclass(frozen=True)
class AlignDataConfig:
    """Pairs of consecutive slices (source z+1 -> target z) and the patches cut from them."""

    patch_size: int = 256  # side of the square training patch, pixels (multiple of 2**(L-1))
    batch_size: int = 4  # pairs per step and per process
    reader_count: int = -1  # workers per device; 0 = in the trainer; -1 = auto
    prefetch_batches: int = 4  # batches each worker keeps ready
    starvation_ms: float = 50.0  # a batch wait above this logs "Input queue starvation", ms
    both_directions: bool = True  # also train z -> z+1 (source and target swapped)
    test_size: int = 384  # side of the centre crop of each test pair, pixels
    test_deformations: int = 2  # seeded known deformations per test slice at evaluation
    test_amplitude: float = 16.0  # largest displacement of those deformations, pixels


@dataclass(frozen=True)
class AlignAugmentConfig:
    """SEAMLeSS augmentation: non-invertible (the data) and invertible (network input only)."""

    enabled: bool = True  # master switch
    translation: float = -1.0  # per-slice shift up to this, pixels; -1 = 2**(levels-1)
    rotation_sigma: float = 0.003  # per-slice rotation ~ N(0, sigma), radians
    scale_sigma: float = 0.005  # per-slice scale ~ N(1, sigma)
    pair_rotation: bool = True  # rotate the pair by a uniform angle and flip it together
    deform_p: float = 0.5  # probability of a smooth random deformation of the source
    deform_sigma: float = 2.0  # std of its coarse-grid displacements, pixels
    edge_band_p: float = 0.3  # probability of a missing edge band (width up to patch / 5)
    cutout_p: float = 0.3  # probability of each cutout kind on the network input
    cutout_max_fraction: float = 0.3  # max cutout side as a fraction of the patch side
    gradient_p: float = 0.3  # probability of a brightness gradient on the network input
    contrast_max: float = 3.0  # global contrast compression by U(1, max)
    noise_sigma: float = 0.05  # Gaussian noise std (normalised units) on the network input


@dataclass(frozen=True)
class FieldNetConfig:
    """The field network (:class:`scarce.models.fieldnet.FieldNet`)."""

    name: str = "fieldnet"  # registry name
    levels: int = 5  # pyramid levels; the coarsest sees shifts of ~2**(levels-1) px
    encoder_widths: tuple[int, ...] | None = None  # channels per level; None = 12 + 6 * l
    aligner_widths: tuple[int, ...] = (24, 32, 24, 16)  # hidden channels of each aligner
    kernel_size: int = 5  # aligner convolution size, pixels (SEAMLeSS: 7)
    finest_level: int = 1  # finest level with an aligner; finer fields are upsampled
    correlation_radius: int = 3  # cost-volume offsets per level, pixels of the level; 0 = none
    smoothing: float = 16.0  # std of the smoothing of each level's match, full-res pixels
    match_temperature: float = 20.0  # sharpness of the soft-argmax over cosine similarities
    input_level: int = 0  # the pyramid starts at 1/2**input_level (no convolution finer)
    match_channels: int = 0  # encodings projected to this many channels for the cost volume
    coarse_affine: bool = False  # the coarsest level fits one robust affine motion, no more
    refine: bool = True  # each level's CNN adds a learned correction to its smoothed match
    finest_iterations: int = 1  # matching passes at the finest level (shrink smoothing bias)


@dataclass(frozen=True)
class AlignLossConfig:
    """Masked MSE of the warped source against the target + lambda_smooth x smoothness."""

    smoothness: str = "rigidity"  # lap | jacob | cjacob | tv | rigidity
    lambda_smooth: float = 1.0  # weight of the smoothness term
    lambda_fold: float = 0.0  # weight of the fold barrier on det(I + grad D) < fold_margin
    fold_margin: float = 0.1  # determinant below which the barrier starts
    lambda_sim_near: float = 5.0  # similarity weight within mask_neighborhood_radius of a defect
    lambda_sim_in: float = 0.0  # similarity weight inside a defect
    lambda_smooth_near: float = 0.05  # smoothness weight near a defect
    lambda_smooth_in: float = 0.0  # smoothness weight inside a defect (the field may tear)
    mask_neighborhood_radius: int = 20  # pixels around a defect counted as "near"
    lambda_consensus: float = 0.0  # 180-degree consensus penalty (SEAMLeSS lambda6)


@dataclass(frozen=True)
class StageConfig:
    """Staged training by pyramid level and collapse detection."""

    stage_steps: int = 300  # steps per stage; stage s trains the s+1 coarsest levels
    finetune_lr_factor: float = 0.2  # learning-rate factor of the last stage (all levels)
    collapse_px: float = 0.1  # mean field magnitude below which a run may have collapsed
    collapse_patience: int = 3  # collapsed evaluations in a row before the run ends


@dataclass(frozen=True)
class AlignConfig(EngineConfig):
    """Everything an alignment training run needs besides the databases and the run folder."""

    data: AlignDataConfig = field(default_factory=AlignDataConfig)
    augment: AlignAugmentConfig = field(default_factory=AlignAugmentConfig)
    model: FieldNetConfig = field(default_factory=FieldNetConfig)
    loss: AlignLossConfig = field(default_factory=AlignLossConfig)
    stage: StageConfig = field(default_factory=StageConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(learning_rate=3e-4))

    def __post_init__(self) -> None:
        super().__post_init__()
        m, d = self.model, self.data
        multiple = 2 ** (m.levels - 1)
        problems = []
        if d.patch_size % multiple or d.test_size % multiple:
            problems.append(
                f"data.patch_size ({d.patch_size}) and data.test_size ({d.test_size}) must be "
                f"multiples of 2**(model.levels - 1) = {multiple}"
            )
        if not 0 <= m.input_level <= m.finest_level < m.levels:
            problems.append(f"need 0 <= model.input_level <= model.finest_level < {m.levels}")
        if m.finest_iterations < 1:
            problems.append(f"model.finest_iterations must be >= 1, got {m.finest_iterations}")
        if d.batch_size < 1 or self.stage.stage_steps < 1:
            problems.append("data.batch_size and stage.stage_steps must be >= 1")
        if problems:
            raise ConfigError("; ".join(problems))


__all__ = [
    "AlignAugmentConfig",
    "AlignConfig",
    "AlignDataConfig",
    "AlignLossConfig",
    "FieldNetConfig",
    "SMOOTHNESS",
    "StageConfig",
]
