"""What a run is: one frozen dataclass per config section, and `Config`.

Every field carries its default; the checks, TOML and run ids live beside it in
`slt.config`, which imports nothing else of slt but its errors."""

from __future__ import annotations

import os
from dataclasses import MISSING, dataclass, field, fields
from typing import Any


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        raise TypeError("use tuples for sequence defaults: configs are frozen")
    return field(default=default, metadata={"help": help, **kw})


class Pickled:
    """A config pickled by an older slt (a SLURM job queued before an upgrade, read when it
    starts) lacks the keys added since: unpickling gives them their defaults, which are
    what that slt computed (a new key never changes what its default does)."""

    def __setstate__(self, state: dict[str, Any]) -> None:
        for f in fields(self):  # type: ignore[arg-type]
            if f.name not in state:
                state[f.name] = f.default if f.default is not MISSING else f.default_factory()
        self.__dict__.update(state)


def default_data_root() -> str:
    """`$SLT_DATA` when set, else ./data (resolved when the config is loaded)."""
    return os.environ.get("SLT_DATA", "./data")


@dataclass(frozen=True)
class DataConfig(Pickled):
    name: str = _f("mnist", "dataset: mnist, fashion_mnist, cifar10, cifar100, imagefolder, "
                   "planted_teacher")
    root: str = _f("", "where datasets live; empty means $SLT_DATA, else ./data")
    download: bool = _f(False, "let torchvision download a missing dataset")
    augment: bool = _f(True, "random crop (pad 4) and horizontal flip for 32x32 colour images")
    # Planted-teacher task: inputs ~ N(0, I), labels = argmax of a random teacher MLP.
    input_dim: int = _f(32, "planted teacher: input dimension")
    num_classes: int = _f(10, "planted teacher: number of classes")
    teacher_hidden: int = _f(64, "planted teacher: hidden width of the random teacher MLP")
    teacher_depth: int = _f(1, "planted teacher: hidden layers of the teacher MLP (a plant "
                            "needs the student's depth)")
    teacher_bias: bool = _f(True, "planted teacher: balance the classes with a bias on the "
                            "logits (true), or with none, by removing the mean hidden "
                            "activation from the output weights (false: what a plant needs, "
                            "since slt's mlp has no biases)")
    train_size: int = _f(8192, "planted teacher: number of training examples")
    test_size: int = _f(2048, "planted teacher: number of test examples")
    seed: int = _f(0, "planted teacher: seed of the teacher and of its examples")
    stream: bool = _f(False, "read image files from disk through DataLoader workers instead "
                      "of holding the dataset in memory (same samples in the same order)")
    workers: int = _f(2, "DataLoader worker processes when data.stream")
    train_limit: int = _f(0, "use a class-balanced subset of this many training examples "
                          "(0: all)")
    test_limit: int = _f(0, "use a class-balanced subset of this many test examples (0: all)")


@dataclass(frozen=True)
class ModelConfig(Pickled):
    name: str = _f("mlp", "architecture: mlp, conv2, conv4, conv6, conv8, vgg16, resnet18, "
                   "resnet20, resnet50; or a reference to your own: torchvision:NAME, "
                   "timm:NAME, python:package.module:factory (docs/models.md)")
    kwargs: tuple[tuple[str, Any], ...] = _f(
        (), "a reference's factory arguments, from a [model.kwargs] table (num_classes is "
        "filled from the data unless given)")
    width: float = _f(1.0, "width multiplier of every hidden layer (built-in models only)")
    hidden: tuple[int, ...] = _f((300, 100), "mlp: hidden layer sizes before the width multiplier")
    init: str = _f("kaiming_normal", "weight init: kaiming_normal or signed_constant")
    init_scale: str = _f("none", "divide the init std by sqrt of this per-layer density: "
                         "none, source or ticket")
    bn_affine: bool = _f(False, "learn BatchNorm scale and shift (off: only scores are learned)")
    first_layer_dense: bool = _f(False, "keep the first layer dense and out of the search")
    last_layer_dense: bool = _f(False, "keep the last layer dense and out of the search")
    search_include: tuple[str, ...] = _f((), "glob patterns over layer or module names: only "
                                         "matching layers are searched (empty: all)")
    search_exclude: tuple[str, ...] = _f((), "glob patterns over layer or module names: "
                                         "matching layers stay dense and frozen")
    bias: str = _f("zero", "a reference's biases: zero, or random (frozen, drawn from run.seed)")
    norm: str = _f("fixed", "a reference's normalisation layers: fixed (scale 1, shift 0, "
                   "frozen) or learned (scale and shift trained with the scores)")


@dataclass(frozen=True)
class SourceConfig(Pickled):
    density: float = _f(1.0, "source density d: fraction of prunable weights in the random source")
    scheme: str = _f("uniform", "layerwise scheme: uniform, er, erk, balanced, pyramidal, custom "
                     "(custom ignores density and needs search.keep)")
    layer_densities: tuple[float, ...] = _f((), "custom scheme: one density per searched layer")
    seed: int = _f(0, "seed of the source mask (edge priorities); weights do not depend on it")


@dataclass(frozen=True)
class SearchConfig(Pickled):
    scorer: str = _f("edge-popup", "scoring rule (`slt scorers` lists them); its options go in "
                     "a [search.scorer] table: name = \"...\", option = value")
    scorer_options: tuple[tuple[str, Any], ...] = _f(
        (), "the rule's options from [search.scorer] (set there, not here)")
    keep: float | None = _f(None, "fraction of source edges the ticket keeps (edge-popup's k); "
                            "0.5 when neither keep nor ticket_density is given")
    ticket_density: float | None = _f(None, "fraction of all prunable weights the ticket keeps")
    scope: str = _f("layer", "top-k per layer (layer) or over all layers at once (global)")
    epochs: int = _f(10, "training epochs of the score search")
    lr: float = _f(0.1, "peak learning rate of the scores")
    momentum: float = _f(0.9, "SGD momentum")
    weight_decay: float = _f(5e-4, "SGD weight decay on the scores")
    nesterov: bool = _f(False, "Nesterov momentum")
    warmup_epochs: float = _f(0.0, "linear warmup before the cosine schedule, in epochs")
    label_smoothing: float = _f(0.0, "label smoothing of the cross-entropy loss")
    batch_size: int = _f(128, "training batch size")
    eval_batch_size: int = _f(1000, "evaluation batch size")


@dataclass(frozen=True)
class RunConfig(Pickled):
    seed: int = _f(0, "seed of the weights, scores and data order; the source does not use it")
    device: str = _f("auto", "auto (cuda when present), cpu or cuda")
    threads: int = _f(0, "CPU threads for torch; 0 leaves torch's default")
    progress: bool = _f(True, "show a progress bar")
    checkpoint_every: int = _f(0, "also checkpoint every this many steps inside an epoch "
                               "(0: at the end of each epoch only); resume is exact either way")
    sync_bn: bool = _f(False, "synchronise BatchNorm batch statistics across processes "
                       "(data-parallel search; CUDA only)")
    precision: str = _f("fp32", "fp32, bf16 or fp16: autocast of forward and backward; scores, "
                        "optimizer state and the top-k stay fp32 (fp16 adds a grad scaler)")
    channels_last: bool = _f(False, "convolutions in channels-last memory format")
    compile: bool = _f(False, "torch.compile the forward pass")
    deterministic: bool = _f(True, "deterministic algorithms (exact resume); false allows "
                             "cuDNN benchmark mode")
    tensorboard: bool = _f(False, "also write TensorBoard event files (per-epoch scalars, "
                           "per-step loss and lr) in the run directory; needs the tb extra")


@dataclass(frozen=True)
class PlantConfig(Pickled):
    enabled: bool = _f(False, "write the planted teacher into the student's frozen weights, so "
                       "a perfect ticket is known (needs data.name = planted_teacher, "
                       "data.teacher_bias = false and an mlp student of the teacher's depth)")
    seed: int = _f(0, "seed of where the teacher's hidden units go among the student's")
    in_source: bool = _f(False, "force the planted edges into the random source (true), or "
                         "draw the source independently of them (false: a planted edge "
                         "survives only where the source keeps it)")
    size_ticket: bool = _f(False, "size the ticket as the plant: each layer keeps exactly as "
                           "many edges as the plant has there (search.keep and "
                           "search.ticket_density are then not used), as Plant 'n' Seek does")


@dataclass(frozen=True)
class Config(Pickled):
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    source: SourceConfig = field(default_factory=SourceConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    run: RunConfig = field(default_factory=RunConfig)
    plant: PlantConfig = field(default_factory=PlantConfig)

    # --- derived values -------------------------------------------------------------------
    @property
    def keep(self) -> float:
        """Fraction of source edges kept (derived from ticket_density when that is given)."""
        if self.search.keep is not None:
            return self.search.keep
        assert self.search.ticket_density is not None
        return self.search.ticket_density / self.source.density

    @property
    def ticket_density(self) -> float:
        """Absolute ticket density aimed at (for a custom scheme: of source.density, which the
        layer list may not match; the built network reports the real one)."""
        if self.search.ticket_density is not None:
            return self.search.ticket_density
        assert self.search.keep is not None
        return self.search.keep * self.source.density

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {s.name: section_dict(getattr(self, s.name)) for s in fields(self)}


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "source": SourceConfig,
    "search": SearchConfig,
    "run": RunConfig,
    "plant": PlantConfig,
}


def dense_source(cfg: Config) -> bool:
    """Whether the source is the whole network, whatever the scheme (a named scheme at
    density 1)."""
    return cfg.source.scheme != "custom" and cfg.source.density >= 1.0


def section_dict(section: Any) -> dict[str, Any]:
    """One section as a TOML table: tuples as lists, the scoring rule and its options as one
    [search.scorer] table."""
    out = {}
    for f in fields(section):
        value = getattr(section, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    if isinstance(section, ModelConfig):
        out["kwargs"] = dict(section.kwargs)  # the [model.kwargs] table
    if isinstance(section, SearchConfig):
        # [search.scorer] is one table: the rule's name and its options
        options = out.pop("scorer_options")
        if options:
            out["scorer"] = {"name": section.scorer, **dict(section.scorer_options)}
    return out
