"""Run configuration: defaults < ``--config FILE`` (TOML / YAML / JSON) < command-line flags."""

from __future__ import annotations

import ast
import dataclasses
import difflib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional


@dataclass
class TrainConfig:
    """Everything one training run needs; ``config.json`` stores it (plus what was resolved)."""

    loss: Optional[str] = "proxy_anchor"
    loss_args: dict = field(default_factory=dict)
    #: options for a loss's ``training_setup`` that are not constructor arguments
    loss_options: dict = field(default_factory=dict)
    miner: Optional[str] = None
    miner_args: dict = field(default_factory=dict)
    dataset: str = "digits"
    #: "auto": mlp for digits, identity for embeddings:PATH, cnn for image folders
    backbone: str = "auto"
    embedding_size: int = 64
    epochs: int = 8
    batch_size: int = 64
    iterations_per_epoch: Optional[int] = None
    #: "auto" (what the loss declares), "random" or "m-per-class"
    sampler: str = "auto"
    m: Optional[int] = None
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    #: learning rate of the loss's own parameters (default: the loss's registered loss_lr, else lr)
    loss_lr: Optional[float] = None
    #: multiply every learning rate by lr_gamma every lr_step epochs
    lr_step: Optional[int] = None
    lr_gamma: float = 0.1
    pooling: str = "avg"
    head_norm: str = "none"
    #: embedding head on the trunk's pooled features: "linear" (a new Linear layer) or "none" (the
    #: features themselves, e.g. a ViT's CLS token; needs embedding_size == the trunk's width)
    head: str = "linear"
    #: epochs of classification pre-training (a linear classifier with cross-entropy on the
    #: embeddings) before the metric loss; None: what the loss declares (its ``pretrain_epochs``), else 0
    pretrain_epochs: Optional[int] = None
    #: class -> text file (JSON object or list, or CSV class,text) for losses that take class
    #: distances; None: ImageFolder folder names, the digit names for digits
    class_texts: Optional[str] = None
    #: separate query / gallery sets for evaluation (ImageFolder folders or .npz files); None: the
    #: test split queried against itself, or DATASET/query + DATASET/gallery when both exist
    query: Optional[str] = None
    gallery: Optional[str] = None
    #: few-shot training: N samples of each training class, drawn with the run's seed (None: all)
    samples_per_class: Optional[int] = None
    #: timm backbones: a local weights file, or "cache" (already-downloaded weights only)
    pretrained: Optional[str] = None
    image_size: Optional[int] = None
    #: "cosine" or "euclidean"; default: what the loss registered (cosine otherwise)
    retrieval_distance: Optional[str] = None
    device: str = "auto"
    #: mixed precision: "auto" (on for CUDA), "on", "off"
    amp: str = "auto"
    seed: int = 0
    num_workers: int = 0
    #: CPU threads for torch; None: 1 for the built-in small backbones (threads cost more than
    #: they give on tiny models, and a fixed count keeps CPU results reproducible), else torch's default
    threads: Optional[int] = None
    eval_batch_size: int = 256
    #: also evaluate binarised embeddings (LayerNorm + sign, pml_plugins.binarize_embeddings):
    #: metrics.json then holds bits_<metric> next to every metric
    eval_binarize: bool = False
    ks: list = field(default_factory=lambda: [1, 2, 4, 8])
    out: Optional[str] = None
    #: checkpoints kept: OUT/checkpoint.pt (the latest) and, for N > 1, the N latest epochs as
    #: OUT/checkpoint-epochNNNN.pt
    keep_last: int = 1
    #: also write TensorBoard events (per-epoch scalars, test metrics, the test embeddings for the
    #: projector) to OUT/tensorboard
    tensorboard: bool = False
    #: DDP under torchrun (batch_size is then the global batch over all processes)
    distributed: bool = False
    #: PML's efficient distributed mode (only for losses that declare distributed_efficient=True)
    distributed_efficient: bool = False

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


#: keys of a config file that only ``compare`` understands
COMPARE_KEYS = ("losses",)
_DICT_KEYS = ("loss_args", "loss_options", "miner_args")


def config_fields() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


def parse_value(text: str) -> Any:
    """A ``key=value`` value: a Python literal (``0.1``, ``True``, ``[1, 2]``), else the string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_key_values(items: Optional[Iterable[str]], what: str) -> dict:
    out: dict = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{what} must look like key=value, got {item!r}")
        out[key.strip()] = parse_value(value.strip())
    return out


def load_config_file(path: str) -> dict:
    """Read a TOML, YAML or JSON config file into a dict (keys as the flags, with underscores)."""
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    ext = os.path.splitext(path)[1].lower()
    with open(path, "rb") as fh:
        raw = fh.read()
    if ext == ".toml":
        try:
            import tomllib
        except ImportError:  # Python < 3.11
            import tomli as tomllib  # type: ignore[no-redef]
        try:
            data = tomllib.loads(raw.decode("utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path}: invalid TOML: {exc}") from None
    elif ext in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ImportError("YAML config files need pyyaml: pip install pyyaml") from None
        try:
            data = yaml.safe_load(raw) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: invalid YAML: {exc}") from None
    elif ext == ".json":
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: invalid JSON: {exc}") from None
    else:
        raise ValueError(f"config file {path!r}: use .toml, .yaml/.yml or .json")
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the config must be a table of options, got {type(data).__name__}")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    data.pop("resolved", None)  # written into config.json by a run; informational
    data.pop("comment", None)
    return data


def check_keys(data: Mapping[str, Any], allowed: Iterable[str], source: str) -> None:
    allowed = list(allowed)
    for key in data:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=2, cutoff=0.6)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ValueError(f"{source}: unknown option {key!r}.{hint}")
    for key in _DICT_KEYS:
        if key in data and data[key] is not None and not isinstance(data[key], dict):
            raise ValueError(f"{source}: {key} must be a table of key = value, got {data[key]!r}")


def build_config(file_values: Mapping[str, Any], flag_values: Mapping[str, Any]) -> TrainConfig:
    """Defaults, then the file, then flags (flags given as None are "not given")."""
    values: dict = {}
    for source in (file_values, flag_values):
        for key, value in source.items():
            if value is None:
                continue
            if key in _DICT_KEYS and isinstance(value, dict):
                values[key] = {**values.get(key, {}), **value}
            else:
                values[key] = value
    fields = set(config_fields())
    cfg = TrainConfig(**{k: v for k, v in values.items() if k in fields})
    return validate(cfg)


def validate(cfg: TrainConfig) -> TrainConfig:
    for name in ("embedding_size", "batch_size", "eval_batch_size", "keep_last"):
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}")
    if not isinstance(cfg.epochs, int) or cfg.epochs < 0:
        raise ValueError(f"epochs must be an integer >= 0, got {cfg.epochs!r}")
    if cfg.m is not None and (not isinstance(cfg.m, int) or cfg.m < 1):
        raise ValueError(f"m must be a positive integer, got {cfg.m!r}")
    if str(cfg.head).lower() not in ("linear", "none"):
        raise ValueError(f"head must be linear or none, got {cfg.head!r}")
    cfg.head = str(cfg.head).lower()
    for name in ("pretrain_epochs", "samples_per_class"):
        value = getattr(cfg, name)
        minimum = 0 if name == "pretrain_epochs" else 1
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < minimum):
            raise ValueError(f"{name.replace('_', '-')} must be an integer >= {minimum}, got {value!r}")
    if (cfg.query is None) != (cfg.gallery is None):
        raise ValueError("query and gallery go together: give both --query and --gallery, or neither")
    if cfg.iterations_per_epoch is not None and cfg.iterations_per_epoch < 1:
        raise ValueError(f"iterations-per-epoch must be >= 1, got {cfg.iterations_per_epoch!r}")
    cfg.sampler = str(cfg.sampler).replace("_", "-").lower()
    if cfg.sampler not in ("auto", "random", "m-per-class"):
        raise ValueError(f"sampler must be auto, random or m-per-class, got {cfg.sampler!r}")
    if cfg.optimizer.lower() not in ("adam", "adamw", "sgd", "rmsprop"):
        raise ValueError(f"optimizer must be adam, adamw, sgd or rmsprop, got {cfg.optimizer!r}")
    cfg.optimizer = cfg.optimizer.lower()
    for name in ("lr", "loss_lr", "weight_decay", "lr_gamma"):
        value = getattr(cfg, name)
        if value is not None and (not isinstance(value, (int, float)) or value < 0):
            raise ValueError(f"{name.replace('_', '-')} must be a number >= 0, got {value!r}")
    if cfg.device not in ("auto", "cpu", "cuda") and not str(cfg.device).startswith("cuda:"):
        raise ValueError(f"device must be auto, cpu or cuda[:N], got {cfg.device!r}")
    for name in ("distributed", "distributed_efficient", "tensorboard"):
        if not isinstance(getattr(cfg, name), bool):
            raise ValueError(f"{name.replace('_', '-')} must be true or false, got {getattr(cfg, name)!r}")
    if cfg.distributed_efficient and not cfg.distributed:
        raise ValueError("distributed-efficient needs distributed (PML's efficient mode is a DDP option)")
    if cfg.amp not in ("auto", "on", "off"):
        raise ValueError(f"amp must be auto, on or off, got {cfg.amp!r}")
    if cfg.retrieval_distance not in (None, "cosine", "euclidean"):
        raise ValueError(f"retrieval-distance must be cosine or euclidean, got {cfg.retrieval_distance!r}")
    cfg.ks = sorted({int(k) for k in cfg.ks})
    if not cfg.ks or cfg.ks[0] < 1:
        raise ValueError(f"ks must be positive integers, got {cfg.ks!r}")
    return cfg
