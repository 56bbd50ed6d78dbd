"""One training run: registry -> data -> model -> PML ``MetricLossOnly`` -> evaluation -> files.

What a loss declares when it registers is honoured here: ``sampler="m_per_class"`` gives PML's
``MPerClassSampler``; loss parameters get their own optimizer (PML's ``metric_loss_optimizer``)
with the registered ``loss_lr``; a ``training_setup`` callable is called with a
:class:`~pml_plugins.TrainingContext` and its :class:`~pml_plugins.TrainingSetup` is merged into
the trainer; ``retrieval_distance`` picks the evaluation geometry.
"""
from __future__ import annotations

import ast
import contextlib
import difflib
import inspect
import json
import logging
import math
import os
import platform
import random
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import tqdm
from pytorch_metric_learning.samplers import MPerClassSampler
from pytorch_metric_learning.trainers import MetricLossOnly
from pytorch_metric_learning.utils import common_functions as c_f

from .. import distributed as dist_mod
from .. import registry as reg
from ..training import TrainingContext, TrainingSetup
from . import data as data_mod
from . import distributed as ddp_mod
from . import models as models_mod
from .config import TrainConfig
from .evaluate import evaluate

#: registry metadata keys a loss may use to ask for a number of samples per class
_M_KEYS = ("m_per_class", "samples_per_class", "m")


@dataclass
class RunResult:
    """What a run produced (also written to ``OUT/metrics.json`` and ``OUT/config.json``)."""

    name: str
    metrics: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    out: Optional[str] = None
    seconds_per_epoch: Optional[float] = None
    train_seconds: float = 0.0
    peak_memory_mb: Optional[float] = None
    memory_kind: str = ""
    error: Optional[str] = None
    #: final epoch loss, epochs run, iterations per epoch
    extra: dict = field(default_factory=dict)


# -- small utilities ---------------------------------------------------------------------------
def set_seed(seed: int) -> None:
    """Seed every RNG the pipeline uses (PML's samplers use numpy's global RNG)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if isinstance(c_f.NUMPY_RANDOM, np.random.RandomState):
        c_f.NUMPY_RANDOM.seed(seed % (2**32))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda requested but torch sees no CUDA device; use --device cpu or auto")
    return device


def write_json(path: Path, obj: Any) -> None:
    """Write atomically, so an interrupted run never leaves a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")
    os.replace(tmp, path)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, (Path, torch.device, torch.dtype)):
        return str(obj)
    return repr(obj)


class PeakMemory:
    """Peak memory of a block above its start: CUDA max allocated, or on CPU the C heap in use.

    On CPU it samples glibc's ``mallinfo2`` (bytes in use, freed memory excluded, so earlier
    runs in the process do not hide this one's peak) every 5 ms, falling back to the process
    RSS from ``/proc/self/statm``. Sampling can miss a peak shorter than 5 ms: an estimate.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_mb: Optional[float] = None
        if device.type == "cuda":
            self.kind = "cuda max allocated"
        else:
            self.kind = "heap in use (sampled)" if _heap_bytes() is not None else "RSS growth (sampled)"

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        self._start = self._peak = _cpu_bytes()
        self._stop = threading.Event()
        if self._start is not None:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            rss = _cpu_bytes()
            if rss is not None and rss > self._peak:
                self._peak = rss

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            self.peak_mb = (torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20
            return
        self._stop.set()
        if self._start is None:
            return
        self._thread.join()
        rss = _cpu_bytes() or 0
        self.peak_mb = max(self._peak, rss) - self._start
        self.peak_mb = max(self.peak_mb, 0) / 2**20


def _load_mallinfo2():
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        fn = libc.mallinfo2
    except (OSError, AttributeError):
        return None

    class _MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                   "fsmblks", "uordblks", "fordblks", "keepcost")]

    fn.restype = _MallInfo2
    return fn


_MALLINFO2 = _load_mallinfo2()


def _heap_bytes() -> Optional[int]:
    if _MALLINFO2 is None:
        return None
    info = _MALLINFO2()
    return int(info.uordblks + info.hblkhd)  # in use: small blocks + mmapped large blocks


def _cpu_bytes() -> Optional[int]:
    heap = _heap_bytes()
    return heap if heap is not None else _rss_bytes()


def _rss_bytes() -> Optional[int]:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


@contextlib.contextmanager
def _quiet_pml_logger():
    """PML's trainer logs key-check warnings (e.g. no optimizer for a parameter-free trunk)."""
    logger = c_f.LOGGER
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


# -- losses and miners -------------------------------------------------------------------------
def constructor_parameters(cls: type) -> tuple[list[str], bool]:
    """Keyword arguments a class accepts, following ``**kwargs`` up the MRO as PML forwards them.

    Returns ``(names, open_ended)``; ``open_ended`` when the chain ends in an unknown ``**kwargs``.
    """
    names: list[str] = []
    for klass in inspect.getmro(cls):
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        if klass is object or klass is torch.nn.Module:
            return names, False
        try:
            params = inspect.signature(init).parameters
        except (TypeError, ValueError):
            return names, True
        forwards = False
        for n, p in params.items():
            if n == "self":
                continue
            if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                forwards = True
            elif n not in names:
                names.append(n)
        if not forwards:
            return names, False
    return names, True


_PML_OBJECT_ARGS = {"distance": "distances", "reducer": "reducers", "weight_regularizer": "regularizers",
                    "embedding_regularizer": "regularizers"}


def _resolve_pml_objects(args: dict) -> dict:
    """``distance="CosineSimilarity()"`` -> an instance of PML's class (literal keyword arguments only)."""
    out = dict(args)
    for key, module_name in _PML_OBJECT_ARGS.items():
        value = out.get(key)
        if not isinstance(value, str):
            continue
        import importlib

        module = importlib.import_module(f"pytorch_metric_learning.{module_name}")
        try:
            expr = ast.parse(value.strip(), mode="eval").body
        except SyntaxError:
            raise ValueError(f"{key}={value!r}: expected a PML class name such as 'CosineSimilarity()'") from None
        call = expr if isinstance(expr, ast.Call) else None
        name_node = call.func if call else expr
        if not isinstance(name_node, ast.Name) or (call and call.args):
            raise ValueError(f"{key}={value!r}: expected ClassName or ClassName(key=value, ...)")
        cls = getattr(module, name_node.id, None)
        if not inspect.isclass(cls):
            options = [n for n in dir(module) if inspect.isclass(getattr(module, n))]
            close = difflib.get_close_matches(name_node.id, options, n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"{key}={value!r}: pytorch_metric_learning.{module_name} has no class {name_node.id!r}.{hint}")
        kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in (call.keywords if call else [])}
        out[key] = cls(**kwargs)
    return out


def build_loss(name: str, *, num_classes: int, embedding_size: int, loss_args: Optional[dict] = None,
               loss_options: Optional[dict] = None) -> tuple[Any, reg.Entry, dict, dict]:
    """Create the loss ``name``; returns ``(loss, entry, constructor_args, training_setup_options)``.

    ``num_classes`` / ``embedding_size`` are passed only when the constructor (or the PML base
    class it forwards ``**kwargs`` to) takes them. For a loss with a ``training_setup``, arguments
    the constructor does not take become its training options.
    """
    entry = reg.get_entry("loss", name)
    cls = entry.obj
    accepted, open_ended = constructor_parameters(cls)
    kwargs = dict(loss_args or {})
    options = dict(loss_options or {})
    has_setup = callable(entry.metadata.get("training_setup"))
    unknown = [k for k in kwargs if k not in accepted]
    if unknown and has_setup:
        options.update({k: kwargs.pop(k) for k in unknown})
    elif unknown and not open_ended:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, accepted, n=1, cutoff=0.6)
            hints.append(f"{k!r} (did you mean {close[0]!r}?)" if close else repr(k))
        raise TypeError(f"loss {entry.name!r} ({cls.__name__}) takes no argument {', '.join(hints)}; "
                        f"it takes: {', '.join(accepted) or 'nothing'}")
    if "num_classes" in accepted and "num_classes" not in kwargs:
        kwargs["num_classes"] = int(num_classes)
    if "embedding_size" in accepted and "embedding_size" not in kwargs:
        kwargs["embedding_size"] = int(embedding_size)
    shown = {k: (v if isinstance(v, (int, float, str, bool, list, tuple, dict, type(None))) else repr(v))
             for k, v in kwargs.items()}
    try:
        loss = reg.create_loss(entry.qualified_name, **_resolve_pml_objects(kwargs))
    except (ValueError, AssertionError) as exc:
        raise ValueError(f"loss {entry.name!r} rejected its arguments {shown}: {exc}") from None
    return loss, entry, shown, options


def build_miner(name: str, miner_args: Optional[dict] = None) -> tuple[Any, reg.Entry]:
    entry = reg.get_entry("miner", name)
    accepted, open_ended = constructor_parameters(entry.obj)
    args = dict(miner_args or {})
    unknown = [k for k in args if k not in accepted]
    if unknown and not open_ended:
        raise TypeError(f"miner {entry.name!r} ({entry.obj.__name__}) takes no argument {unknown}; "
                        f"it takes: {', '.join(accepted) or 'nothing'}")
    try:
        return reg.create_miner(entry.qualified_name, **_resolve_pml_objects(args)), entry
    except (ValueError, AssertionError) as exc:
        raise ValueError(f"miner {entry.name!r} rejected its arguments {args}: {exc}") from None


# -- sampler -----------------------------------------------------------------------------------
def choose_m(batch_size: int, num_classes: int, m: Optional[int], preferred: int = 4) -> int:
    """Samples per class for an m-per-class batch; an explicit ``m`` is checked, not changed."""
    def fits(k: int) -> bool:
        return batch_size % k == 0 and k * num_classes >= batch_size

    if m is not None:
        if batch_size % m:
            ok = [d for d in range(1, batch_size + 1) if batch_size % d == 0 and d * num_classes >= batch_size]
            raise ValueError(f"batch size {batch_size} is incompatible with the m-per-class sampler: m={m} must "
                             f"divide it (m values that fit: {ok[:6]})")
        if m * num_classes < batch_size:
            raise ValueError(f"batch size {batch_size} is incompatible with the m-per-class sampler: m={m} x "
                             f"{num_classes} training classes gives at most {m * num_classes} samples per batch; "
                             f"use --batch-size <= {m * num_classes} or a larger --m")
        return m
    if fits(preferred):
        return preferred
    for k in range(preferred, batch_size + 1):
        if fits(k):
            return k
    for k in range(preferred - 1, 0, -1):
        if fits(k):
            return k
    raise ValueError(f"batch size {batch_size} cannot be built m-per-class from {num_classes} classes")


# -- the trainer -------------------------------------------------------------------------------
class _Trainer(MetricLossOnly):
    """PML's ``MetricLossOnly`` with a labelled, transient tqdm bar, a NaN guard, per-epoch
    timing, and mixed precision for the trunk on CUDA."""

    def __init__(self, *args: Any, progress: bool = True, desc: str = "", amp_dtype: Optional[torch.dtype] = None,
                 after_backward: Optional[Callable[[], None]] = None, loss_scale: float = 1.0, **kwargs: Any):
        self._progress, self._desc, self._amp_dtype = progress, desc, amp_dtype
        #: distributed: fixes the loss parameters' gradients; PML's wrapper returns W x the loss
        self._after_backward, self._loss_scale = after_backward, loss_scale
        self._scaler = torch.amp.GradScaler("cuda") if amp_dtype is torch.float16 else None
        self.epoch_seconds: list[float] = []
        self.last_loss = math.nan
        super().__init__(*args, **kwargs)

    def train(self, start_epoch: int = 1, num_epochs: int = 1) -> None:
        self.initialize_dataloader()
        for self.epoch in range(start_epoch, num_epochs + 1):
            start = time.perf_counter()
            self.set_to_train()
            pbar = tqdm.tqdm(range(self.iterations_per_epoch), desc=f"{self._desc} epoch {self.epoch}/{num_epochs}",
                             leave=False, disable=not self._progress, dynamic_ncols=True)
            total = 0.0
            for self.iteration in pbar:
                self.forward_and_backward()
                loss = float(torch.as_tensor(self.losses["total_loss"]).detach()) * self._loss_scale
                if not math.isfinite(loss):
                    raise FloatingPointError(f"the loss became {loss} at epoch {self.epoch}, iteration "
                                             f"{self.iteration + 1} (try a lower --lr / --loss-lr)")
                total += loss
                self.end_of_iteration_hook(self)
                pbar.set_postfix(loss=f"{loss:.4f}")
                self.step_lr_schedulers(end_of_epoch=False)
            self.last_loss = total / max(self.iterations_per_epoch, 1)
            self.step_lr_schedulers(end_of_epoch=True)
            self.zero_losses()
            self.epoch_seconds.append(time.perf_counter() - start)
            if self.end_of_epoch_hook(self) is False:
                break

    def get_trunk_output(self, data):
        if self._amp_dtype is None:
            return super().get_trunk_output(data)
        with torch.autocast("cuda", dtype=self._amp_dtype):
            return super().get_trunk_output(data)

    def backward(self) -> None:
        if self._scaler is None:
            super().backward()
        else:
            self._scaler.scale(self.losses["total_loss"]).backward()
        if self._after_backward is not None:
            self._after_backward()

    def step_optimizers(self) -> None:
        if self._scaler is None:
            return super().step_optimizers()
        for k, v in self.optimizers.items():
            if c_f.regex_replace("_optimizer$", "", k) not in self.freeze_these:
                self._scaler.step(v)
        self._scaler.update()


def _make_optimizer(name: str, params: list, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, weight_decay=weight_decay, momentum=0.9)
    return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay, momentum=0.9)


def _chain(*hooks: Optional[Callable]) -> Callable:
    hooks = [h for h in hooks if h is not None]

    def hook(trainer: Any) -> Any:
        keep_going = True
        for h in hooks:
            if h(trainer) is False:
                keep_going = False
        return keep_going

    return hook


def _default_backbone(kind: str) -> str:
    return {"embeddings": "identity"}.get(kind, "cnn")


def _versions() -> dict:
    import pytorch_metric_learning

    from .. import __version__

    return {"pml_plugins": __version__, "pytorch_metric_learning": pytorch_metric_learning.__version__,
            "torch": torch.__version__, "python": platform.python_version()}


# -- the run -----------------------------------------------------------------------------------
def run_training(cfg: TrainConfig, *, progress: bool = True, log: Optional[Callable[[str], None]] = None,
                 name: Optional[str] = None, write_checkpoint: bool = True) -> RunResult:
    """Train ``cfg.loss`` (or, with ``cfg.loss=None`` / ``epochs=0``, only evaluate the untrained
    model), evaluate on the test split and write ``metrics.json``, ``config.json``,
    ``checkpoint.pt`` and ``metrics.png`` under ``cfg.out`` (when set)."""
    name = name or cfg.loss or "untrained"
    threads = cfg.threads
    if threads is None and (cfg.backbone == "auto" or not cfg.backbone.startswith("timm:")):
        threads = 1
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        if not cfg.distributed:
            return _run(cfg, name, progress=progress, log=log, write_checkpoint=write_checkpoint)
        env = dist_mod.env_from_torchrun()
        device = ddp_mod.local_device(resolve_device(cfg.device), env)
        with ddp_mod.process_group(env, device):
            lead = env.rank == 0  # only rank 0 logs, evaluates and writes
            return _run(cfg, name, progress=progress and lead, log=log if lead else None,
                        write_checkpoint=write_checkpoint, env=env, device=device)
    finally:
        torch.set_num_threads(previous)


def _run(cfg: TrainConfig, name: str, *, progress: bool, log: Optional[Callable[[str], None]],
         write_checkpoint: bool, env: Optional[dist_mod.DistributedEnv] = None,
         device: Optional[torch.device] = None) -> RunResult:
    device = device if device is not None else resolve_device(cfg.device)
    amp_dtype = None
    if device.type == "cuda" and cfg.amp in ("auto", "on"):
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    elif cfg.amp == "on":
        raise ValueError("--amp on needs a CUDA device (mixed precision is for GPUs here)")

    # Fail fast on names before touching data: unknown loss / miner / dataset / backbone.
    train = cfg.loss is not None and cfg.epochs > 0
    entry = reg.get_entry("loss", cfg.loss) if cfg.loss is not None else None
    if cfg.miner and entry is None:
        raise ValueError("a miner needs a loss")
    if cfg.miner:
        reg.get_entry("miner", cfg.miner)
    kind, _ = data_mod.parse_dataset_spec(cfg.dataset)
    backbone = _default_backbone(kind) if cfg.backbone == "auto" else cfg.backbone
    models_mod.parse_backbone(backbone)

    set_seed(cfg.seed)
    model = models_mod.build_model(backbone, embedding_size=cfg.embedding_size,
                                   input_shape=data_mod.feature_shape(cfg.dataset), image_size=cfg.image_size,
                                   pooling=cfg.pooling, head_norm=cfg.head_norm, pretrained=cfg.pretrained)
    splits = data_mod.load_data(cfg.dataset, model.transforms)
    trunk, embedder = model.trunk.to(device), model.embedder.to(device)

    resolved: dict = {"name": name, "device": str(device), "amp": str(amp_dtype) if amp_dtype else "off",
                      "backbone": backbone, "model": model.description, "data": splits.describe(),
                      "num_train_classes": splits.num_train_classes, "threads": torch.get_num_threads(), "versions": _versions(), "command": sys.argv}
    if env is not None:
        resolved["distributed"] = {"world_size": env.world_size, "rank": env.rank,
                                   "backend": torch.distributed.get_backend()}
    retrieval = cfg.retrieval_distance or "cosine"
    trainer = None
    epoch_seconds: list[float] = []
    mem = PeakMemory(device)
    if train:
        loss, entry, loss_args, options = build_loss(entry.qualified_name, num_classes=splits.num_train_classes,
                                                     embedding_size=cfg.embedding_size, loss_args=cfg.loss_args,
                                                     loss_options=cfg.loss_options)
        loss = loss.to(device)
        semantics = None
        if env is not None:  # refuse a loss that cannot run distributed before touching the data
            semantics = dist_mod.check_distributed_support(entry, efficient=cfg.distributed_efficient)
            dist_mod.broadcast_module(loss)
        needs = entry.needs()
        retrieval = cfg.retrieval_distance or needs["retrieval_distance"] or "cosine"
        miner = build_miner(cfg.miner, cfg.miner_args)[0] if cfg.miner else None
        resolved.update(loss=entry.qualified_name, loss_class=f"{type(loss).__module__}.{type(loss).__qualname__}",
                        loss_plugin=f"{entry.distribution or entry.plugin} {entry.version or ''}".strip(),
                        loss_args=loss_args, loss_needs={k: v for k, v in needs.items()})

        # What the loss asks of the trainer (multi-view batches, a database refresh, ...).
        setup = TrainingSetup()
        training_setup = entry.metadata.get("training_setup")
        if callable(training_setup):
            def embed(x: torch.Tensor) -> torch.Tensor:
                modes = trunk.training, embedder.training
                trunk.eval(), embedder.eval()
                try:
                    with torch.no_grad():
                        return embedder(trunk(c_f.to_device(x, device=device)))
                finally:
                    trunk.train(modes[0]), embedder.train(modes[1])

            context = TrainingContext(trunk=trunk, embedder=embedder, train_dataset=splits.train,
                                      batch_size=cfg.batch_size, epochs=cfg.epochs, device=device, seed=cfg.seed,
                                      num_workers=cfg.num_workers, embed=embed, options=dict(options),
                                      progress=progress, rank=env.rank if env is not None else 0,
                                      world_size=env.world_size if env is not None else 1)
            setup = training_setup(loss, context) or TrainingSetup()
            if not isinstance(setup, TrainingSetup):
                raise TypeError(f"{entry.name}'s training_setup returned {type(setup).__name__}, "
                                f"expected pml_plugins.TrainingSetup")
            resolved["training_setup"] = {"options": options, "views_per_sample": setup.views_per_sample,
                                          "replaces_dataset": setup.train_dataset is not None,
                                          "sampler": type(setup.sampler).__name__ if setup.sampler else None}
        elif options:
            raise TypeError(f"loss {entry.name!r} has no training_setup, so it takes no loss options {sorted(options)}")
        train_dataset = setup.train_dataset if setup.train_dataset is not None else splits.train

        sampler_name = cfg.sampler
        if sampler_name == "auto":
            sampler_name = "m-per-class" if needs["sampler"] == "m_per_class" else "random"
        sampler, m = setup.sampler, None
        if sampler is None and sampler_name == "m-per-class":
            labels = splits.train_labels if setup.train_dataset is None else data_mod.dataset_labels(train_dataset)
            preferred = next((int(entry.metadata[k]) for k in _M_KEYS if entry.metadata.get(k)), 4)
            m = choose_m(cfg.batch_size, len(np.unique(labels)), cfg.m, preferred)
            length = max(len(labels), cfg.batch_size)
            sampler = MPerClassSampler(labels, m, batch_size=cfg.batch_size, length_before_new_iter=length)
        if sampler is None and cfg.batch_size > len(train_dataset):
            raise ValueError(f"batch size {cfg.batch_size} is larger than the training split "
                             f"({len(train_dataset)} samples)")
        resolved["sampler"] = (type(setup.sampler).__name__ if setup.sampler is not None
                               else ("MPerClassSampler" if m else "random"))
        resolved["m"] = m
        local_batch = cfg.batch_size
        if env is not None:  # each rank takes its slice of the same global batches
            base = sampler if sampler is not None else ddp_mod.GlobalRandomSampler(len(train_dataset), cfg.seed)
            sampler = ddp_mod.RankSliceSampler(base, cfg.batch_size, env.rank, env.world_size)
            local_batch = sampler.local_batch_size
            resolved["distributed"].update({
                "global_batch_size": cfg.batch_size, "local_batch_size": local_batch,
                "efficient": cfg.distributed_efficient, "loss_semantics": semantics or "not declared",
                "loss_parameter_gradients": f"all-reduced sum / {env.world_size if cfg.distributed_efficient else env.world_size ** 2}"})

        optimizers, models = {}, {"trunk": trunk, "embedder": embedder}
        for key, module in models.items():
            params = [p for p in module.parameters() if p.requires_grad]
            if params:
                optimizers[f"{key}_optimizer"] = _make_optimizer(cfg.optimizer, params, cfg.lr, cfg.weight_decay)
        loss_params = [p for p in loss.parameters() if p.requires_grad]
        loss_lr = None
        if loss_params:
            loss_lr = float(cfg.loss_lr if cfg.loss_lr is not None else (needs["loss_lr"] or cfg.lr))
            optimizers["metric_loss_optimizer"] = _make_optimizer(cfg.optimizer, loss_params, loss_lr, cfg.weight_decay)
        resolved["loss_lr"] = loss_lr
        if log is not None:
            lr_text = f", loss parameters lr {loss_lr:g}" if loss_lr is not None else ""
            sampler_text = f"m-per-class (m={m})" if m else resolved["sampler"]
            views = f", {setup.views_per_sample} views/sample" if setup.views_per_sample != 1 else ""
            log(f"{name}: {type(loss).__name__} [{resolved['loss_plugin']}] on {splits.describe()}; "
                f"{model.description}; {cfg.epochs} epochs x batch {cfg.batch_size}, sampler {sampler_text}{views}, "
                f"{cfg.optimizer} lr {cfg.lr:g}{lr_text}; {device}; retrieval {retrieval}")
        schedulers = None
        if cfg.lr_step:
            schedulers = {k.replace("_optimizer", "_scheduler_by_epoch"):
                          torch.optim.lr_scheduler.StepLR(o, step_size=cfg.lr_step, gamma=cfg.lr_gamma)
                          for k, o in optimizers.items()}
        metric_loss, after_backward, loss_scale = loss, None, 1.0
        if env is not None:
            models = {k: ddp_mod.wrap_model(v, device) for k, v in models.items()}
            metric_loss = dist_mod.wrap_loss(loss, entry, efficient=cfg.distributed_efficient)
            miner = dist_mod.wrap_miner(miner, efficient=cfg.distributed_efficient) if miner is not None else None
            if loss_params:
                def after_backward() -> None:
                    dist_mod.average_loss_gradients(loss, efficient=cfg.distributed_efficient)
            loss_scale = 1.0 / env.world_size
            if log is not None:
                log(f"distributed: {env.world_size} processes ({resolved['distributed']['backend']}), global batch "
                    f"{cfg.batch_size} = {env.world_size} x {local_batch}; {name} semantics: "
                    f"{semantics or 'not declared'}")
            torch.manual_seed(cfg.seed + env.rank)  # distinct augmentation streams; samplers are shared
        with _quiet_pml_logger():
            trainer = _Trainer(models=models, optimizers=optimizers, batch_size=local_batch,
                               loss_funcs={"metric_loss": metric_loss}, dataset=train_dataset,
                               mining_funcs={"tuple_miner": miner} if miner is not None else {},
                               iterations_per_epoch=cfg.iterations_per_epoch, data_device=device, sampler=sampler,
                               collate_fn=setup.collate_fn, lr_schedulers=schedulers,
                               dataloader_num_workers=cfg.num_workers,
                               end_of_iteration_hook=_chain(setup.end_of_iteration_hook),
                               end_of_epoch_hook=_chain(setup.end_of_epoch_hook),
                               progress=progress, desc=name, amp_dtype=amp_dtype,
                               after_backward=after_backward, loss_scale=loss_scale)
        with mem:
            if setup.before_training is not None:
                setup.before_training()
            trainer.train(num_epochs=cfg.epochs)
        epoch_seconds = trainer.epoch_seconds
        if trainer.iterations_per_epoch == 0:
            raise ValueError(f"no full batch of {cfg.batch_size} fits in the training split")
    resolved["retrieval_distance"] = retrieval

    lead = env is None or env.rank == 0
    metrics = {}
    if lead:
        metrics = evaluate(trunk, embedder, splits.test, device=device, retrieval_distance=retrieval, ks=cfg.ks,
                           batch_size=cfg.eval_batch_size, progress=progress, with_bits=cfg.eval_binarize)
    result = RunResult(name=name, metrics=metrics, out=cfg.out,
                       seconds_per_epoch=(sum(epoch_seconds) / len(epoch_seconds)) if epoch_seconds else None,
                       train_seconds=sum(epoch_seconds), peak_memory_mb=mem.peak_mb if train else None,
                       memory_kind=mem.kind)
    result.config = {**cfg.to_dict(), "resolved": resolved}
    if trainer is not None:
        result.extra = {"final_epoch_loss": trainer.last_loss, "epochs_run": len(epoch_seconds),
                                "iterations_per_epoch": trainer.iterations_per_epoch}
    if cfg.out and lead:
        _write_outputs(Path(cfg.out), result, trunk, embedder, trainer, write_checkpoint)
    return result


def metrics_record(result: RunResult) -> dict:
    return {"name": result.name, "metrics": result.metrics, "seconds_per_epoch": result.seconds_per_epoch,
            "train_seconds": result.train_seconds, "peak_memory_mb": result.peak_memory_mb,
            "memory_kind": result.memory_kind, **result.extra}


def _write_outputs(out: Path, result: RunResult, trunk, embedder, trainer, write_checkpoint: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if write_checkpoint:
        loss = trainer.loss_funcs["metric_loss"] if trainer is not None else None
        if isinstance(loss, dist_mod.DistributedLossWrapper):
            loss = loss.loss
        state = {"trunk": trunk.state_dict(), "embedder": embedder.state_dict(),
                 "loss": loss.state_dict() if loss is not None else None}
        tmp = out / "checkpoint.pt.tmp"
        torch.save(state, tmp)
        os.replace(tmp, out / "checkpoint.pt")
    plot_metrics(result.metrics, out / "metrics.png", title=result.name)
    write_json(out / "config.json", result.config)
    write_json(out / "metrics.json", metrics_record(result))  # last: its presence marks a finished run


def plot_metrics(metrics: dict, path: Path, title: str = "") -> None:
    """Recall@k and nDCG@k against k."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
    for prefix, label in (("recall_at_", "Recall@k"), ("ndcg_at_", "nDCG@k")):
        pts = sorted((int(k[len(prefix):]), v) for k, v in metrics.items()
                     if k.startswith(prefix) and k[len(prefix):].isdigit())
        if pts:
            ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k")
    ax.set_ylabel("%")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, path)
