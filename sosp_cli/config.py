"""Typed run configuration: plain dataclasses (no Hydra here).

The CLI registers these classes as Hydra structured-config schemas, so a typo such as
``method.num_batchs=4`` or a wrong type fails at composition; the pipeline receives the same
classes filled in. Field names are the config keys documented in the README.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional


@dataclass
class DatasetConfig:
    name: str = "digits"
    root: str = "data"            # folder holding the dataset (relative paths: from the launch dir)
    download: bool = False        # CIFAR only: download into root when online
    image_size: int = 32
    val_size: int = 5000          # images held out of the training set for validation
    split_seed: int = 0           # the train/val(/test for digits) split is fixed by this seed
    augment: bool = True
    num_workers: int = 0


@dataclass
class ModelConfig:
    name: str = "resnet20"
    width: Any = 1.0              # one multiplier, or a list with one per stage


@dataclass
class TrainConfig:
    epochs: int = 1
    batch_size: int = 128
    optimizer: str = "sgd"        # sgd | adamw
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    no_decay_bn_bias: bool = False  # exempt BatchNorm and bias parameters from weight decay
    scheduler: str = "multistep"  # multistep | cosine | constant
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])  # fractions of epochs
    gamma: float = 0.1
    warmup_epochs: int = 0
    label_smoothing: float = 0.0
    max_batches: Optional[int] = None  # cap on batches per epoch (smoke runs)
    bn_momentum: Optional[float] = None  # every BatchNorm's running-statistics momentum while this stage trains (None: the model's own)


@dataclass
class ScheduleConfig:
    name: str = "quick"
    pretrain: TrainConfig = field(default_factory=TrainConfig)
    finetune: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class MethodConfig:
    name: str = "l1"
    combine: str = "abs_sum"      # abs_sum | abs_joint | second_only (second-order methods)
    curvature: str = "gn"         # gn | hessian | fisher_mc (fisher_mc: sosp_i only)
    selection: str = "score"      # score | greedy (sosp_i only)
    max_structures: int = 20000   # sosp_i: refuse an S×S matrix beyond this S
    chunk_size: int = 16          # sosp_i / obd / hessian: classes (or directions) per backward
    stack_batch: str = "auto"     # sosp_h (gn): auto (CPU: pair; GPU: whole, halves after an out-of-memory) | half | pair | whole
    sparsity: float = 0.0         # L1 penalty on BatchNorm γ during pretraining (slimming)


@dataclass
class PruneConfig:
    ratio: float = 0.5            # fraction of ``target`` removed, in [0, 1)
    target: str = "structures"    # structures | params | flops (MACs)
    scope: str = "global"         # global ranking across layers (the paper) | local (per layer)
    min_channels: int = 1         # no structure group keeps fewer channels than this
    max_layer_ratio: float = 1.0  # no structure group loses more than this fraction
    normalize: str = "none"       # none | layer_mean | layer_max (scores per layer group)
    round_to: int = 1             # every pruned group keeps a multiple of this many structures
    steps: int = 1                # iterative pruning: k rounds, saliency recomputed in between
    step_epochs: int = 0          # fine-tuning epochs between rounds
    diagnostics: bool = False     # predicted vs real loss change of the removed set
    diagnostics_samples: int = 32  # structures sampled for the single-structure Spearman check


@dataclass
class SaliencyConfig:
    num_samples: int = 512        # N: training images the saliency is computed on
    batch_size: int = 64
    batchnorm: str = "running"    # running (eval-mode BN, the default) | batch (each batch's statistics)
    tf32: bool = False            # CUDA: TensorFloat-32 convolutions / matrix products (utils.float32_products)


@dataclass
class PretrainConfig:
    checkpoint: Optional[str] = None  # use this trained model instead of pretraining
    cache_dir: str = "outputs/cache"  # content-addressed cache of pretrained models
    use_cache: bool = True


@dataclass
class BottleneckConfig:
    """Expand-prune (the paper's Fig. 3): see sosp_cli/bottleneck.py."""
    detect_ratio: float = 0.5     # structures removed by the detection run on the original model
    num_widened: int = 1          # how many stages (lowest pruning ratio) are widened
    widen_factor: float = 2.0     # width multiplier of the bottleneck stages
    uniform_factor: float = 1.1   # the control: every stage widened by this
    ratios: list[float] = field(default_factory=lambda: [0.0, 0.3, 0.5, 0.7])  # params removed
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])


@dataclass
class RunConfig:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    saliency: SaliencyConfig = field(default_factory=SaliencyConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    task: str = "prune"           # prune (one run) | bottleneck (the expand-prune experiment)
    bottleneck: BottleneckConfig = field(default_factory=BottleneckConfig)
    note: str = ""                # printed at the start of the run (presets explain choices here)
    experiment_name: str = "default"  # recorded in result.json; set by experiment presets
    seed: int = 0
    device: str = "auto"          # auto | cpu | cuda
    amp: bool = False             # CUDA mixed precision for training
    channels_last: bool = False
    latency_repeats: int = 10     # timed repeats per latency measurement (median reported)


def to_dict(cfg) -> dict:
    return asdict(cfg)
