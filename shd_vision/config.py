"""Structured configs: the schema every composed config is typed against, and its range checks.

Values live in the YAML files under ``conf/``; the dataclasses here give every key its type
and, through field metadata, its valid range. Hydra checks types while composing;
:func:`check_config` checks ranges and choices and raises :class:`UserError` naming the key.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from omegaconf import MISSING, DictConfig, OmegaConf, open_dict

from shd_vision.errors import UserError

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = PROJECT_ROOT / "conf"


# Keys that may differ between the sessions of one run: where it runs, how it is logged, when it
# stops and checkpoints. A key names itself and everything below it. Kept in README.md too;
# engine/identity.py compares runs on the rest, and the report's rows must agree on them.
RESUMABLE = (
    "run_name", "task_name", "paths", "logger",
    "trainer.resume", "trainer.max_steps", "trainer.log_every", "trainer.ckpt_every_steps",
    "trainer.device", "trainer.threads", "trainer.dist_backend", "trainer.compile", "trainer.channels_last",
    "trainer.tf32", "trainer.export", "trainer.attention_images", "trainer.eval_teacher",
    "trainer.teacher_floor",
    "data.root", "data.num_workers", "data.pin_memory", "data.eval_batch_size", "data.skip_bad_images",
)


def resumable(key: str) -> bool:
    """Whether ``key`` may differ between the sessions of one run (it or a parent is in RESUMABLE)."""
    return any(key == k or key.startswith(k + ".") for k in RESUMABLE)


def inside_project(value: Any, root: str) -> Any:
    """A path inside the project (a shipped teacher) as ``${paths.root_dir}/...``: the same run
    in another clone of the project is the same run."""
    if root and isinstance(value, str) and value.startswith(root + "/"):
        return "${paths.root_dir}" + value[len(root):]
    return value


def greater_than(bound: float, default: Any = MISSING) -> Any:
    return field(default=default, metadata={"gt": bound})


def at_least(bound: float, default: Any = MISSING) -> Any:
    return field(default=default, metadata={"ge": bound})


def between(lo: float, hi: float, default: Any = MISSING) -> Any:
    return field(default=default, metadata={"ge": lo, "le": hi})


def one_of(*choices: Any, default: Any = MISSING) -> Any:
    return field(default=default, metadata={"choices": choices})


@dataclass
class PathsConfig:
    root_dir: str = MISSING
    data_dir: str = MISSING
    log_dir: str = MISSING
    teacher_dir: str = MISSING
    output_dir: Optional[str] = MISSING  # None only when Hydra prints the config (--cfg job --resolve)


@dataclass
class AugConfig:
    """Training augmentation, passed to ``timm.data.create_transform``."""

    scale: List[float] = MISSING
    ratio: List[float] = MISSING
    hflip: float = between(0.0, 1.0)
    vflip: float = between(0.0, 1.0)
    color_jitter: Optional[float] = at_least(0.0, None)
    auto_augment: Optional[str] = None
    re_prob: float = between(0.0, 1.0)
    re_mode: str = one_of("const", "rand", "pixel", default="pixel")
    re_count: int = at_least(1, 1)
    interpolation: str = MISSING
    crop_pct: Optional[float] = between(0.01, 1.0, None)
    affine: Optional[str] = one_of(None, "pil", "opencv", default=None)  # RandAugment's warps; null: pil


@dataclass
class MixupConfig:
    """Mixup/CutMix (``timm.data.Mixup``) and label smoothing; all zero turns both off."""

    mixup_alpha: float = at_least(0.0)
    cutmix_alpha: float = at_least(0.0)
    prob: float = between(0.0, 1.0)
    switch_prob: float = between(0.0, 1.0)
    mode: str = one_of("batch", "pair", "elem", default="batch")
    label_smoothing: float = between(0.0, 0.99)


@dataclass
class DataConfig:
    name: str = MISSING  # fashion_mnist, digits, synthetic, imagefolder, hfds/<dataset>, wds/<name>
    root: Optional[str] = None
    num_classes: Optional[int] = greater_than(0, None)
    class_map: Optional[str] = None  # timm's class map (one class name per line): the class order
    train_split: str = MISSING
    val_split: str = MISSING
    train_size: Optional[int] = greater_than(0, None)
    val_size: Optional[int] = greater_than(0, None)
    holdout: Optional[int] = greater_than(0, None)  # validate on this many held-out training images
    batch_size: int = greater_than(0)
    eval_batch_size: Optional[int] = greater_than(0, None)
    num_workers: int = at_least(0)
    pin_memory: bool = MISSING
    img_size: Optional[int] = greater_than(0, None)
    mean: Optional[List[float]] = None
    std: Optional[List[float]] = None
    repeated_aug: int = at_least(0)
    skip_bad_images: bool = False  # replace an unreadable image by the next readable one instead of stopping
    normalize_on_device: Optional[bool] = None  # workers ship uint8; the training device normalises and erases
    aug: AugConfig = field(default_factory=AugConfig)
    mixup: MixupConfig = field(default_factory=MixupConfig)


@dataclass
class KDConfig:
    """A distillation method: weighted loss terms, each one registered in ``shd_vision.distill``."""

    name: str = MISSING
    terms: Dict[str, Any] = MISSING


@dataclass
class OptimConfig:
    """Passed to ``timm.optim.create_optimizer_v2``; ``lr`` null derives it from ``lr_base``."""

    opt: str = MISSING
    lr: Optional[float] = greater_than(0.0, None)
    lr_base: float = greater_than(0.0)
    lr_base_size: int = greater_than(0)
    lr_base_scale: str = one_of("linear", "sqrt", default="linear")
    weight_decay: float = at_least(0.0)
    momentum: float = at_least(0.0)
    layer_decay: Optional[float] = between(0.0, 1.0, None)
    betas: Optional[List[float]] = None
    eps: Optional[float] = greater_than(0.0, None)


@dataclass
class SchedConfig:
    """Passed to ``timm.scheduler.create_scheduler_v2`` (stepped every update)."""

    sched: str = one_of("cosine", "tanh", "step", "multistep", "poly", "constant", default="cosine")
    warmup_epochs: int = at_least(0)
    warmup_lr: float = at_least(0.0)
    min_lr: float = at_least(0.0)
    decay_epochs: Optional[float] = greater_than(0.0, None)
    decay_milestones: List[int] = MISSING
    decay_rate: float = greater_than(0.0)


@dataclass
class EmaConfig:
    enabled: bool = MISSING
    decay: float = between(0.0, 1.0)
    warmup: bool = MISSING


@dataclass
class TrainerConfig:
    epochs: int = greater_than(0)
    max_steps: Optional[int] = greater_than(0, None)
    device: str = MISSING
    precision: str = one_of("32", "bf16", "fp16", default="32")
    compile: bool = MISSING
    channels_last: bool = MISSING
    tf32: bool = MISSING
    grad_clip: Optional[float] = greater_than(0.0, None)
    accumulate: int = greater_than(0)
    log_every: int = greater_than(0)
    ckpt_every_steps: int = at_least(0)
    resume: Optional[str] = None
    init_from: Optional[str] = None
    threads: Optional[int] = greater_than(0, None)
    dist_backend: str = one_of("auto", "nccl", "gloo", default="auto")
    export: bool = MISSING
    attention_images: int = at_least(0)
    eval_teacher: bool = MISSING
    teacher_floor: float = at_least(0.0, 2.0)
    allow_random_teacher: bool = MISSING
    ema: EmaConfig = field(default_factory=EmaConfig)


@dataclass
class WandbConfig:
    project: str = MISSING
    entity: Optional[str] = None
    mode: str = one_of("online", "offline", "disabled", default="offline")
    group: Optional[str] = None
    tags: List[str] = field(default_factory=list)
    log_images: bool = MISSING


@dataclass
class LoggerConfig:
    csv: bool = MISSING
    wandb: Optional[WandbConfig] = None


@dataclass
class TaskConfig:
    """What every entry point's config has: its task (logs/<task_name>/), its run and the paths."""

    task_name: str = MISSING
    run_name: str = MISSING
    paths: PathsConfig = field(default_factory=PathsConfig)


@dataclass
class TrainConfig(TaskConfig):
    seed: int = at_least(0)
    model: Dict[str, Any] = MISSING
    teacher: Optional[Dict[str, Any]] = None
    data: DataConfig = field(default_factory=DataConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)


@dataclass
class CacheOptions:
    """How ``python -m shd_vision.cache`` stores the teacher's logits (methods.md §10)."""

    top_k: int = greater_than(0)
    dtype: str = one_of("float16", "float32", default="float16")
    dir: str = MISSING
    resume: Optional[str] = one_of("auto", default=None)
    processes: Optional[int] = greater_than(0, None)  # the planned run's; null: this launch's


@dataclass
class CacheConfig(TrainConfig):
    """A train config (the planned run) plus how its teacher's logits are stored."""

    cache: CacheOptions = field(default_factory=CacheOptions)


@dataclass
class EvalConfig(TaskConfig):
    ckpt: str = MISSING
    use_ema: bool = MISSING
    model: Optional[Dict[str, Any]] = None
    data: Optional[DataConfig] = None
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


@dataclass
class PackOptions:
    """How ``python -m shd_vision.data.pack`` writes a data set as WebDataset shards."""

    out: Optional[str] = None  # required: the directory the shards go to
    size: int = greater_than(0, 256)  # the stored images' largest shorter side
    quality: int = between(1, 100, 90)  # JPEG quality of a resized image
    shard_images: int = greater_than(0, 1024)


@dataclass
class PackConfig(TrainConfig):
    """A train config (whose ``data`` is read) plus where and how its shards are written."""

    pack: PackOptions = field(default_factory=PackOptions)


@dataclass
class QuickstartPlan:
    teacher: List[str] = MISSING  # train.py overrides of the teacher run
    students: List[str] = MISSING  # train.py overrides shared by the student runs
    methods: List[str] = MISSING  # one student per kd config
    method_overrides: Dict[str, List[str]] = field(default_factory=dict)  # extra overrides per method
    seeds: List[int] = field(default_factory=lambda: [0])  # every method runs once per seed
    retrain_teacher: bool = False  # train the teacher (plan.teacher) instead of using the shipped one
    reference: Optional[str] = None  # a comparison.json of several seeds: the noise column


@dataclass
class QuickstartConfig(TrainConfig):
    """A train config plus the quickstart's plan: every train.py override applies to all its runs."""

    quickstart: QuickstartPlan = field(default_factory=QuickstartPlan)


@dataclass
class VizConfig(TaskConfig):
    ckpt: str = MISSING
    teacher_checkpoint: Optional[str] = None
    images: int = at_least(1)
    batch: int = greater_than(0)
    layers: Any = None
    merge: Optional[str] = one_of("progressive", "group", "mean", "select", default=None)
    temperature: Optional[float] = greater_than(0.0, None)
    device: str = MISSING


@dataclass
class ReportConfig(TaskConfig):
    dir: str = MISSING
    out: Optional[str] = None
    by: Optional[List[str]] = None
    paired: List[str] = field(default_factory=list)  # rows to compare every other row with, seed by seed
    extend: List[str] = field(default_factory=list)  # numeric keys whose edge optima extend.txt extends
    x: Optional[str] = None  # a key of the table to draw top-1 against (trend.png)
    x_label: Optional[str] = None  # its axis's name (None: the key)


def register_schemas() -> None:
    """Put the schemas in Hydra's ConfigStore as the ``schema`` group (the primary configs list
    them first: ``- schema: train``)."""
    cs = ConfigStore.instance()
    for name, node in (("train", TrainConfig), ("eval", EvalConfig), ("quickstart", QuickstartConfig),
                       ("cache", CacheConfig), ("pack", PackConfig), ("viz", VizConfig), ("report", ReportConfig)):
        cs.store(group="schema", name=name, node=node, package="_global_")


def compose_train(overrides: List[str], config_name: str = "train") -> DictConfig:
    """A ``train.py`` config composed outside ``train.py`` (the quickstart, tests), its run
    directory resolved into ``paths.output_dir`` as Hydra's main would."""
    ctx = (contextlib.nullcontext() if GlobalHydra.instance().is_initialized()
           else initialize_config_dir(str(CONF_DIR), version_base="1.3"))
    with ctx:
        cfg = compose(config_name=config_name, overrides=list(overrides), return_hydra_config=True)
    run_dir = cfg.hydra.run.dir
    with open_dict(cfg):
        del cfg["hydra"]
        cfg.paths.output_dir = run_dir
    return cfg


def check_config(cfg: DictConfig, prefix: str = "") -> None:
    """Check every value against the range and choices its schema field declares.

    Raises:
        UserError: naming the first key whose value is out of range.
    """
    schema = OmegaConf.get_type(cfg)
    if not is_dataclass(schema):
        return
    for f in fields(schema):
        key = f"{prefix}{f.name}"
        value = cfg[f.name]
        if isinstance(value, DictConfig):
            check_config(value, key + ".")
            continue
        if value is None:
            continue
        meta = f.metadata
        if "choices" in meta and value not in meta["choices"]:
            valid = ", ".join(str(c) for c in meta["choices"])
            raise UserError(f"{key}={value} is not a valid choice; use one of: {valid}.")
        bad = (("gt" in meta and not value > meta["gt"]) or ("ge" in meta and not value >= meta["ge"])
               or ("le" in meta and not value <= meta["le"]))
        if bad:
            raise UserError(f"{key}={value} is out of range: it must be {_describe_range(meta)}.")


def _describe_range(meta: Any) -> str:
    parts = []
    if "gt" in meta:
        parts.append(f"greater than {meta['gt']}")
    if "ge" in meta:
        parts.append(f"at least {meta['ge']}")
    if "le" in meta:
        parts.append(f"at most {meta['le']}")
    return " and ".join(parts)


def run_stamp() -> str:
    """The name of a run directory, the same for every process of one launch.

    A SLURM job is named by its id, which a requeued job keeps (``trainer.resume=auto`` then
    finds the checkpoints of the attempt before). A multi-node torchrun launch is named by its
    rendezvous id (``--rdzv-id``, the same on every node). On one node, torchrun workers are
    children of one agent process, which outlives worker restarts, so its start time and pid name
    the launch. Elsewhere it is the current time and this process's pid: two launches on one
    machine never share a name, even in the same second (a job array, a shell loop with ``&``).
    The run directory's lock (``engine/identity.py``) refuses any launch into a held directory.
    """
    env = os.environ
    if "SLURM_JOB_ID" in env:
        array = env.get("SLURM_ARRAY_TASK_ID")
        return f"slurm-{env['SLURM_JOB_ID']}" + (f"_{array}" if array else "")
    multi_node = env.get("WORLD_SIZE", "1") != env.get("LOCAL_WORLD_SIZE", env.get("WORLD_SIZE", "1"))
    if multi_node and env.get("TORCHELASTIC_RUN_ID", "none") != "none":
        return f"torchrun-{env['TORCHELASTIC_RUN_ID']}"
    if "TORCHELASTIC_RUN_ID" in env:
        started = _process_start_time(os.getppid())
        if started is not None:
            return f"{started:%Y-%m-%d_%H-%M-%S}_{os.getppid()}"
    return f"{_dt.datetime.now():%Y-%m-%d_%H-%M-%S}_{os.getpid()}"


def _process_start_time(pid: int) -> Optional[_dt.datetime]:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime"))
    except (OSError, StopIteration, IndexError, ValueError):
        return None
    ticks = int(stat[19])  # field 22 of /proc/PID/stat, counted after the command name
    return _dt.datetime.fromtimestamp(boot + ticks / os.sysconf("SC_CLK_TCK"))


def register_resolvers() -> None:
    resolvers = {
        "project_root": lambda: str(PROJECT_ROOT),
        "run_stamp": run_stamp,
    }
    for name, fn in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn, use_cache=True)


register_schemas()
register_resolvers()
