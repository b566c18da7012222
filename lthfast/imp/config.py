"""The IMP run configuration: one dataclass holding every option, its parsing and its validation.

Durations (``train_steps``, ``rewind``, ``warmup``, ``milestones``, ``eval_every``, ``checkpoint_every``) are
written as iterations ("500it", or a bare integer) or epochs ("2ep", fractional allowed), as in open_lth. They are
turned into iterations by ``Config.steps(...)`` once the dataset (hence the steps per epoch) is known.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field

from lthfast.imp.errors import ConfigError

OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")
SCHEDULES = ("constant", "step", "cosine")
CONTROLS = ("random_reinit", "random_prune", "rearrange")
DEVICES = ("auto", "cpu", "cuda")
AMP = ("none", "bf16", "fp16")
EARLY_STOP = ("val_loss", "val_acc")
# --block sizes: the kernels' tile sizes (lthfast.kernels, lthfast.ops), and 1 for unstructured pruning.
BLOCKS = (1, 4, 8, 16, 32, 64, 128)
# Options that say where and how loudly a run happens, not what it computes: they may change on resume. (compile
# changes the rounding of fused elementwise ops only, like threads, so a run may be resumed with or without it;
# cuda_graph the optimizer's kernels only: fused SGD, capturable Adam; sequential and max_parallel the summation
# order of the products, as units trained together share batched ones.)
NOT_IDENTITY = (
    "out_dir", "name", "quiet", "force", "cache_dir", "data_dir", "checkpoint_every", "threads", "plots", "compile",
    "cuda_graph", "sequential", "max_parallel",
)  # fmt: skip
# Options added after runs were made: they enter the identity only when not at these defaults, so that the runs made
# before keep their names and can be resumed.
# early_stop: best validation accuracy was the only criterion before the option existed, so the runs made then hash
# as "val_acc" runs and resume under the rule they were made with; the default (Frankle & Carbin's) is new.
# block / nm: a run made before them pruned single weights (block 1, no N:M).
LATE_OPTIONS = {"amp": "none", "early_stop": "val_acc", "block": 1, "nm": None}
# How far a run goes, not what any unit of it computes (a unit's seeds and inputs do not depend on them): running
# again with more levels or replicates extends the run directory and keeps its finished units. Runs made before
# were named with them in the hash (``legacy_identity``); the driver still finds those under their old name.
EXTENT = ("levels", "replicates")


@dataclass
class Config:
    # model and data
    model: str = field(
        default="mlp",
        metadata={"help": "mlp, lenet, conv2/4/6, vgg11/16/19, resnet20/56, resnet18 (ImageNet widths, 11.2M weights; "
                  "Frankle & Carbin's CIFAR 'Resnet-18', 16-64 channels, is resnet20)"},
    )  # fmt: skip
    hidden: tuple[int, ...] = field(default=(256, 256), metadata={"help": "mlp hidden widths, e.g. 300,100"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on fully-connected hidden layers"})
    dataset: str = field(default="mnist1d", metadata={"help": "mnist1d, digits, synthetic, mnist, cifar10"})
    data_dir: str | None = field(default=None, metadata={"help": "folder holding local mnist / cifar10 files"})
    num_samples: int = field(default=10_000, metadata={"help": "examples generated (mnist1d, synthetic)"})
    synthetic_shape: tuple[int, ...] = field(default=(3, 32, 32), metadata={"help": "synthetic input shape"})
    val_size: float = field(default=0.1, metadata={"help": "validation split: fraction (<1) or count of train"})
    augment: bool = field(default=False, metadata={"help": "random crop + flip (image data)"})
    # training
    batch_size: int = field(default=100, metadata={"help": "minibatch size"})
    train_steps: str = field(default="2000it", metadata={"help": "training length per level: 3000it or 40ep"})
    optimizer: str = field(default="adam", metadata={"help": "sgd, momentum, adam, adamw"})
    lr: float = field(default=1e-3, metadata={"help": "learning rate"})
    momentum: float = field(default=0.9, metadata={"help": "momentum (optimizer momentum)"})
    weight_decay: float = field(default=0.0, metadata={"help": "weight decay"})
    schedule: str = field(default="constant", metadata={"help": "constant, step, cosine"})
    milestones: tuple[str, ...] = field(default=(), metadata={"help": "step schedule milestones, e.g. 80ep,120ep"})
    gamma: float = field(default=0.1, metadata={"help": "step schedule decay factor"})
    warmup: str = field(default="0it", metadata={"help": "linear learning-rate warmup length"})
    # pruning
    levels: int = field(default=11, metadata={"help": "pruning levels after the dense level 0"})
    prune_fraction: float = field(default=0.2, metadata={"help": "fraction of alive weights pruned per level"})
    layerwise: bool = field(default=False, metadata={"help": "prune each layer separately (default: global)"})
    layer_fractions: dict[str, str] = field(
        default_factory=dict, metadata={"help": "per-layer rates, e.g. out.weight=x0.5,fc1.weight=0.3"}
    )
    leave_dense: tuple[str, ...] = field(default=(), metadata={"help": "layer name patterns never pruned"})
    one_shot: bool = field(default=False, metadata={"help": "prune the trained dense network to each density"})
    rewind: str = field(default="0it", metadata={"help": "rewind point: 0it (init), 500it, 2ep"})
    block: int = field(
        default=1,
        metadata={"help": "prune whole B x B blocks, B in 1 (single weights), 4, 8, 16, 32, 64, 128: a Linear weight "
                  "[out, in] in B x B tiles from (0, 0), a Conv2d in B Cout x B Cin channel tiles across the kh x kw "
                  "window; blocks ranked by the L1 norm of their weights divided by their number of elements (edge "
                  "blocks: their own size), levels remove as many blocks as bring the weights remaining nearest the "
                  "usual schedule"},
    )  # fmt: skip
    nm: str | None = field(
        default=None,
        metadata={"help": "prune towards N:M (e.g. 2:4): each level prunes by magnitude only weights outside the N "
                  "largest of their group of M consecutive inputs; the level whose schedule reaches N/M leaves exactly "
                  "N alive per group, and is the last level allowed"},
    )  # fmt: skip
    # controls and replicates
    controls: tuple[str, ...] = field(
        default=(),
        metadata={"help": "random_reinit, random_prune, rearrange (the same distribution as random_prune for "
                  "unstructured masks: another draw) or all"},
    )  # fmt: skip
    control_levels: tuple[int, ...] = field(default=(), metadata={"help": "levels with controls (default: all)"})
    replicates: int = field(default=1, metadata={"help": "independent replicates (init, data order, pruning)"})
    seed: int = field(default=0, metadata={"help": "base seed of every replicate's seeds"})
    # bookkeeping
    early_stop: str = field(
        default="val_loss",
        metadata={"help": "early-stop iteration: val_loss (the first minimum of validation loss, Frankle & Carbin) "
                  "or val_acc (the first maximum of validation accuracy)"},
    )  # fmt: skip
    eval_every: str = field(default="50it", metadata={"help": "evaluation interval"})
    checkpoint_every: str = field(default="1000it", metadata={"help": "checkpoint interval (at evaluations)"})
    backend: str = field(default="auto", metadata={"help": "lthfast backend: auto, torch, triton"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda (under torchrun: cuda:LOCAL_RANK)"})
    amp: str = field(default="none", metadata={"help": "mixed precision: none, bf16, fp16 (fp16 with a GradScaler)"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model for training (fullgraph)"})
    cuda_graph: bool = field(
        default=True,
        metadata={"help": "on CUDA, replay each unit's training step as a CUDA graph after 3 eager warm-up steps "
                  "(captured again for every unit, so after every prune); off under DDP, fp16 and --compile"},
    )  # fmt: skip
    sequential: bool | None = field(
        default=None,
        metadata={"help": "train one unit at a time; --no-sequential trains the ready units (every replicate's level, "
                  "its controls) together, stacked into one model (default: together on CUDA, one at a time on the "
                  "CPU, where stacking measured slower)"},
    )  # fmt: skip
    max_parallel: int = field(
        default=0, metadata={"help": "most units trained together (0: as many as fit in free memory)"}
    )
    out_dir: str = field(default="runs", metadata={"help": "parent folder of run directories"})
    name: str | None = field(default=None, metadata={"help": "run directory name (default: from the config)"})
    cache_dir: str | None = field(default=None, metadata={"help": "generated-data cache (default: OUT_DIR/.cache)"})
    threads: int = field(default=0, metadata={"help": "CPU threads for torch (0: torch's default)"})
    plots: bool = field(default=True, metadata={"help": "draw plots/*.png at the end of the run"})
    quiet: bool = field(default=False, metadata={"help": "no progress bars or level lines"})
    force: bool = field(default=False, metadata={"help": "delete what the run directory holds and start over"})

    def __post_init__(self) -> None:
        if tuple(self.controls) == ("all",):
            self.controls = CONTROLS

    # ---- construction -------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: dict, where: str = "config") -> Config:
        """A Config from a mapping of option -> value (dashes or underscores; strings or native values)."""
        hints = typing.get_type_hints(cls)
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in values.items():
            name = str(key).replace("-", "_")
            if name not in known:
                raise ConfigError(f"{where}: unknown option {key!r}")
            kwargs[name] = coerce(name, hints[name], value, where)
        return cls(**kwargs)

    @classmethod
    def from_file(cls, path: str) -> Config:
        """A Config from a YAML (.yaml/.yml) or JSON file."""
        return cls.from_dict(read_config_file(path), where=path)

    def replace(self, **changes) -> Config:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def identity(self) -> dict:
        """The options that determine the results of every unit (compared on resume, hashed into the run name);
        ``levels`` and ``replicates`` are not among them: more of either extends a run."""
        return {
            k: v
            for k, v in self.to_dict().items()
            if k not in NOT_IDENTITY and k not in EXTENT and not (k in LATE_OPTIONS and v == LATE_OPTIONS[k])
        }

    def legacy_identity(self) -> dict:
        """The identity runs made before ``EXTENT`` left it were hashed with (their run directories' names)."""
        return {**self.identity(), **{k: getattr(self, k) for k in EXTENT}}

    def short_hash(self) -> str:
        return digest(self.identity())

    def run_name(self) -> str:
        return self.name or f"{self.model}-{self.dataset}-{self.short_hash()}"

    # ---- validation ---------------------------------------------------------------------------------------
    def validate(self, *, custom_model: bool = False, custom_data: bool = False) -> Config:
        """Check every option that needs no data; raise ConfigError with a one-line message. Returns self."""
        from lthfast._backend import BACKENDS
        from lthfast.data import DATASETS
        from lthfast.models import MODELS

        if not custom_model and self.model not in MODELS:
            raise ConfigError(f"unknown model {self.model!r}: expected one of {', '.join(MODELS)}")
        if not custom_data and self.dataset not in DATASETS:
            raise ConfigError(f"unknown dataset {self.dataset!r}: expected one of {', '.join(DATASETS)}")
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("backend", self.backend, BACKENDS)
        _choice("device", self.device, DEVICES)
        _choice("amp", self.amp, AMP)
        _choice("early_stop", self.early_stop, EARLY_STOP)
        for control in self.controls:
            _choice("control", control, CONTROLS)
        if len(set(self.controls)) != len(self.controls):
            raise ConfigError(f"controls {list(self.controls)} lists a control twice")
        if not 0 < self.prune_fraction < 1:
            raise ConfigError(f"prune_fraction must be in (0, 1), got {self.prune_fraction}")
        if self.block not in BLOCKS:
            raise ConfigError(f"block must be one of {', '.join(map(str, BLOCKS))}, got {self.block}")
        if self.nm is not None:
            self._check_nm()
        for name, rate in self.layer_fractions.items():
            _check_rate(name, rate, self.prune_fraction)
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if not (0 < self.val_size < 1 or (self.val_size >= 1 and float(self.val_size).is_integer())):
            raise ConfigError(f"val_size must be a fraction in (0, 1) or a whole count >= 1, got {self.val_size}")
        for name, low in (("levels", 0), ("replicates", 1), ("batch_size", 1), ("num_samples", 10), ("threads", 0),
                          ("max_parallel", 0)):  # fmt: skip
            if getattr(self, name) < low:
                raise ConfigError(f"{name} must be >= {low}, got {getattr(self, name)}")
        if any(w < 1 for w in self.hidden) or any(s < 1 for s in self.synthetic_shape):
            raise ConfigError("hidden widths and synthetic_shape must be positive integers")
        if not self.lr > 0 or self.weight_decay < 0 or not 0 <= self.momentum < 1 or not 0 < self.gamma <= 1:
            raise ConfigError("lr must be > 0, weight_decay >= 0, momentum in [0, 1) and gamma in (0, 1]")
        bad_levels = [lv for lv in self.control_levels if not 1 <= lv <= self.levels]
        if bad_levels:
            raise ConfigError(f"control_levels {bad_levels} outside the pruned levels 1..{self.levels}")
        for name in ("train_steps", "rewind", "warmup", "eval_every", "checkpoint_every"):
            parse_duration(getattr(self, name), name)
        for text in self.milestones:
            parse_duration(text, "milestones")
        if self.name is not None and (not self.name or "/" in self.name or self.name in (".", "..")):
            raise ConfigError(f"name {self.name!r} must be a plain folder name")
        return self

    def nm_pair(self) -> tuple[int, int] | None:
        """(N, M) of ``nm`` ("2:4" -> (2, 4)), or None. Raises ConfigError when it is not N:M with 1 <= N < M."""
        if self.nm is None:
            return None
        parts = str(self.nm).strip().split(":")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ConfigError(f"nm must be N:M with whole numbers, like 2:4, got {self.nm!r}")
        n, m = (int(p) for p in parts)
        if not 1 <= n < m:
            raise ConfigError(f"nm {self.nm}: need 1 <= N < M (N of every M weights kept)")
        return n, m

    def nm_level(self) -> int:
        """The first level whose weights remaining, (1 - prune_fraction)^level, is at most N/M: there the masks
        become N:M, and no later level can prune more."""
        n, m = self.nm_pair()
        return math.ceil(math.log(n / m) / math.log(1 - self.prune_fraction) - 1e-9)

    def _check_nm(self) -> None:
        self.nm_pair()
        if self.block != 1:
            raise ConfigError(f"block {self.block} and nm {self.nm} are two granularities: choose one")
        if self.levels > self.nm_level():
            raise ConfigError(
                f"nm {self.nm} reaches its N:M mask at level {self.nm_level()} with prune_fraction "
                f"{self.prune_fraction:g}: later levels cannot prune more; ask for levels <= {self.nm_level()}"
            )

    def controls_at(self) -> list[int]:
        """Levels at which the controls run (every pruned level unless ``control_levels`` names some)."""
        if not self.controls:
            return []
        return sorted(set(self.control_levels)) if self.control_levels else list(range(1, self.levels + 1))

    def steps(self, steps_per_epoch: int) -> Steps:
        """Every duration in iterations, checked against the training length (rewind and warmup inside it)."""
        to_it = lambda text, what: to_iterations(text, steps_per_epoch, what)
        steps = Steps(
            train=to_it(self.train_steps, "train_steps"),
            rewind=to_it(self.rewind, "rewind"),
            warmup=to_it(self.warmup, "warmup"),
            milestones=tuple(to_it(m, "milestones") for m in self.milestones),
            eval_every=to_it(self.eval_every, "eval_every"),
            checkpoint_every=to_it(self.checkpoint_every, "checkpoint_every"),
            steps_per_epoch=steps_per_epoch,
        )
        if steps.train < 1:
            raise ConfigError(f"train_steps {self.train_steps} is less than one iteration")
        if steps.rewind >= steps.train:
            raise ConfigError(
                f"rewind point {self.rewind} ({steps.rewind} it) is past the end of training "
                f"({self.train_steps} = {steps.train} it)"
            )
        if steps.warmup > steps.train or any(m > steps.train for m in steps.milestones):
            raise ConfigError(f"warmup and milestones must lie within training ({steps.train} it)")
        if steps.eval_every < 1:
            raise ConfigError(f"eval_every {self.eval_every} is less than one iteration")
        return steps


def digest(identity: dict) -> str:
    """The 8 hex digits of a run directory's default name (``<model>-<dataset>-<digest>``)."""
    return hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:8]


@dataclass(frozen=True)
class Steps:
    """Durations of a run in iterations."""

    train: int
    rewind: int
    warmup: int
    milestones: tuple[int, ...]
    eval_every: int
    checkpoint_every: int
    steps_per_epoch: int


def parse_duration(text, what: str) -> tuple[float, str]:
    """ "500it" / "500" -> (500, "it"); "2ep" / "0.5ep" -> (2.0, "ep"). Raises ConfigError."""
    s = str(text).strip().lower()
    unit = "ep" if s.endswith("ep") else "it"
    number = s[:-2] if s.endswith(("ep", "it")) else s
    try:
        value = float(number)
    except ValueError:
        raise ConfigError(f"{what}: {text!r} is not a duration like 500it or 2ep") from None
    if not math.isfinite(value) or value < 0 or (unit == "it" and not value.is_integer()):
        raise ConfigError(f"{what}: {text!r} must be a whole number of iterations or a number of epochs >= 0")
    return value, unit


def to_iterations(text, steps_per_epoch: int, what: str) -> int:
    value, unit = parse_duration(text, what)
    return int(value) if unit == "it" else int(round(value * steps_per_epoch))


def read_config_file(path: str) -> dict:
    """The mapping in a YAML or JSON config file; ConfigError naming the file when it cannot be used."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror or exc}") from None
    try:
        if str(path).endswith(".json"):
            values = json.loads(text)
        else:
            import yaml

            values = yaml.safe_load(text)
    except Exception as exc:  # noqa: BLE001 - yaml and json raise many types; all mean "malformed"
        raise ConfigError(f"config file {path}: cannot parse ({type(exc).__name__}: {exc})".splitlines()[0]) from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path}: expected a mapping of option: value, got {type(values).__name__}")
    return values


def coerce(name: str, hint, value, where: str = "config"):
    """Convert a string (command line) or a native value (YAML / JSON) to the option's type."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    try:
        if value is None:
            if type(None) in args:
                return None
            raise ValueError("null is not allowed")
        if origin in (typing.Union, types.UnionType):
            (inner,) = [a for a in args if a is not type(None)]
            return coerce(name, inner, value, where)
        if origin is tuple:
            if isinstance(value, str):
                items = [v for v in value.split(",") if v.strip()]
            else:  # a single YAML / JSON value is a one-item tuple, as the flag's "64" is
                items = list(value) if isinstance(value, (list, tuple)) else [value]
            return tuple(coerce(name, args[0], item, where) for item in items)
        if origin is dict:
            if isinstance(value, str):
                pairs = [item.split("=", 1) for item in value.split(",") if item.strip()]
                if any(len(p) != 2 for p in pairs):
                    raise ValueError("expected name=value pairs")
                value = dict(pairs)
            return {str(k).strip(): str(v).strip() for k, v in dict(value).items()}
        if hint is bool:
            if isinstance(value, str):
                if value.strip().lower() in ("1", "true", "yes", "on"):
                    return True
                if value.strip().lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError("expected true or false")
            return bool(value)
        if hint in (int, float) and isinstance(value, bool):
            raise ValueError("expected a number, got a boolean")  # YAML's yes / true would pass as 1
        if hint is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError("expected a whole number")
            return int(value)
        return hint(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: option {name}={value!r}: {exc}") from None


def _choice(what: str, value: str, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"unknown {what} {value!r}: expected one of {', '.join(allowed)}")


def _check_rate(name: str, rate: str, prune_fraction: float) -> None:
    """The layer's fraction per level (a multiplier times prune_fraction) must be in [0, 1): at 1 the layer is
    fully pruned at level 1 and cannot be pruned at level 2."""
    text = str(rate).strip()
    multiplier = text[:1] in ("x", "*")
    try:
        value = float(text[1:]) if multiplier else float(text)
    except ValueError:
        raise ConfigError(
            f"layer_fractions[{name}]={rate!r}: expected a fraction like 0.1 or a multiplier like x0.5"
        ) from None
    fraction = value * prune_fraction if multiplier else value
    if not 0 <= fraction < 1:
        detail = f" (x prune_fraction {prune_fraction} = {fraction:g})" if multiplier else ""
        raise ConfigError(f"layer_fractions[{name}]={rate!r}{detail}: the fraction per level must be in [0, 1)")
