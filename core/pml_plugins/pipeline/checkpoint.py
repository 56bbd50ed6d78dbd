"""Training checkpoints: what ``OUT/checkpoint.pt`` holds, how it is written, read and checked.

A checkpoint is a dict of tensors and plain Python types only, so it loads with
``torch.load(path, weights_only=True)``: nothing in it is ever unpickled as code. It is written
atomically (a temporary file, then ``os.replace``), so a kill during the write leaves the previous
checkpoint intact. :func:`load_checkpoint` turns every way a file can be wrong (missing, empty,
truncated, corrupt, random bytes, pickled objects, another run's) into one ``ValueError`` line
that says what is wrong, never torch's advice to re-run with ``weights_only=False``.

The keys (``FORMAT`` marks a pml-plugins checkpoint; older runs' final checkpoints, with only
``trunk`` / ``embedder`` / ``loss``, are still read for evaluation):

``format``, ``epoch`` (epochs completed), ``iteration`` (steps done in epoch ``epoch + 1`` when a
Ctrl-C saved mid-epoch, else 0), ``trunk``, ``embedder``, ``loss`` (state dicts), ``optimizers``,
``schedulers``, ``scaler``, ``plugin`` (what the loss's training setup keeps), ``rng``,
``trainer`` (epoch losses and times so far), ``best`` (best validation metric so far: None, the
pipeline evaluates once at the end), ``config`` (the run's settings).
"""

from __future__ import annotations

import io
import os
import pickle
import random
import zipfile
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import numpy as np
import torch

#: value of the ``format`` key of a checkpoint written by this module
FORMAT = "pml-plugins checkpoint v1"
CHECKPOINT_NAME = "checkpoint.pt"
#: config keys that may differ between a run and its resumption (where it runs, how it reports)
RESUME_FREE_KEYS = ("out", "device", "num_workers", "eval_batch_size", "threads", "keep_last")

PathLike = Union[str, os.PathLike]


# -- random states ---------------------------------------------------------------------------------
def _pml_numpy_random() -> Any:
    from pytorch_metric_learning.utils import common_functions as c_f

    return c_f.NUMPY_RANDOM


def _numpy_state(rs: Any) -> dict:
    name, keys, pos, has_gauss, cached = rs.get_state()
    return {
        "name": str(name),
        "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }


def _set_numpy_state(rs: Any, state: Mapping) -> None:
    rs.set_state(
        (
            state["name"],
            state["keys"].numpy().astype(np.uint32),
            int(state["pos"]),
            int(state["has_gauss"]),
            float(state["cached_gaussian"]),
        )
    )


def seed_all(seed: int) -> None:
    """Seed torch, numpy's global RNG, Python's ``random`` and PML's ``NUMPY_RANDOM`` (when it is
    its own ``RandomState``; by default it is numpy's global RNG)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    pml = _pml_numpy_random()
    if isinstance(pml, np.random.RandomState):
        pml.seed(seed % (2**32))


def capture_rng_state() -> dict:
    """Every random state training draws from: torch (CPU and CUDA), numpy's global RNG,
    Python's ``random`` and PML's ``NUMPY_RANDOM`` (when it is its own ``RandomState``)."""
    version, internal, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": _numpy_state(np.random),
        "python": {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
    }
    pml = _pml_numpy_random()
    if isinstance(pml, np.random.RandomState):
        state["pml_numpy"] = _numpy_state(pml)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping) -> None:
    """Undo :func:`capture_rng_state` (CUDA states only where the same number of devices exists)."""
    torch.set_rng_state(state["torch"])
    _set_numpy_state(np.random, state["numpy"])
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    pml = _pml_numpy_random()
    if "pml_numpy" in state and isinstance(pml, np.random.RandomState):
        _set_numpy_state(pml, state["pml_numpy"])
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


# -- writing ---------------------------------------------------------------------------------------
def numbered_name(epoch: int) -> str:
    """The file name ``--keep-last`` keeps for ``epoch`` (``checkpoint-epoch0003.pt``)."""
    return f"checkpoint-epoch{int(epoch):04d}.pt"


def save_checkpoint(state: Mapping[str, Any], out: PathLike, keep_last: int = 1) -> Path:
    """Write ``state`` to ``OUT/checkpoint.pt`` atomically; return its path.

    With ``keep_last`` N > 1 the N most recent epochs are also kept as numbered files
    (:func:`numbered_name`, hard links to the same bytes where the file system allows; older
    numbered files are deleted). ``keep_last=1`` (the default) keeps the latest only.
    """
    if not isinstance(keep_last, int) or isinstance(keep_last, bool) or keep_last < 1:
        raise ValueError(f"keep_last must be a positive integer, got {keep_last!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / CHECKPOINT_NAME
    tmp = out / (CHECKPOINT_NAME + ".tmp")
    torch.save(dict(state), tmp)
    os.replace(tmp, path)  # atomic: a reader sees the old file or the new one, never half of one
    if keep_last > 1 and not state.get("iteration"):  # numbered files only at epoch ends
        _keep_numbered(path, int(state.get("epoch", 0)), keep_last)
    return path


def _keep_numbered(path: Path, epoch: int, keep_last: int) -> None:
    target = path.with_name(numbered_name(epoch))
    tmp = path.with_name(target.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(path, tmp)
    except OSError:  # no hard links here (some network / FAT file systems): a copy
        import shutil

        shutil.copyfile(path, tmp)
    os.replace(tmp, target)
    numbered = sorted(
        p for p in path.parent.glob("checkpoint-epoch*.pt") if p.stem[len("checkpoint-epoch") :].isdigit()
    )
    for old in numbered[:-keep_last]:
        old.unlink(missing_ok=True)


# -- reading ---------------------------------------------------------------------------------------
def checkpoint_path(path: PathLike) -> Path:
    """A run folder -> its ``checkpoint.pt``; a file stays as it is. Missing: FileNotFoundError."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
        if not path.is_file():
            raise FileNotFoundError(
                f"run folder {str(path.parent)!r} has no {CHECKPOINT_NAME} (was the run "
                f"stopped before its first epoch ended?)"
            )
    elif not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    return path


def load_checkpoint(path: PathLike, map_location: Any = "cpu", mmap: bool = False) -> dict:
    """Read a checkpoint safely (``weights_only=True``); every failure is one clear ``ValueError``.

    ``path`` is a ``.pt`` file or a run folder. A file that needs pickle to load (Python objects
    other than tensors and plain types) is refused and never unpickled.
    """
    path = checkpoint_path(path)
    where = f"checkpoint {str(path)!r}"
    obj = safe_torch_load(path, where, map_location, mmap=mmap)
    if (
        not isinstance(obj, dict)
        or not isinstance(obj.get("trunk"), Mapping)
        or not isinstance(obj.get("embedder"), Mapping)
    ):
        kind = type(obj).__name__ if not isinstance(obj, dict) else f"dict with keys {sorted(map(str, obj))[:8]}"
        raise ValueError(
            f"{where} is not a pml-plugins checkpoint (expected a dict with trunk and embedder state dicts, got {kind})"
        )
    return obj


def safe_torch_load(path: PathLike, where: Optional[str] = None, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` whose every failure is one ``ValueError`` line
    starting with ``where`` (default: the path): empty, not a zip archive, truncated, corrupt,
    or needing pickle (refused, never unpickled)."""
    path = Path(path)
    where = where or f"{str(path)!r}"
    if not path.is_file():
        raise FileNotFoundError(f"{where} does not exist")
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"{where} is empty (0 bytes): the run was probably killed while writing it")
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head[:2] != b"PK":
        raise ValueError(
            f"{where} is not a torch checkpoint (it is not a zip archive: {size} bytes of another "
            f"format or random data)"
        )
    problem = _zip_problem(path)
    if problem:
        raise ValueError(f"{where} is truncated or corrupt ({problem}); use an earlier checkpoint or train again")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        # torch's message here suggests weights_only=False: never repeat that advice
        raise ValueError(
            f"{where} holds Python objects that need pickle to load; refused (it was not unpickled: "
            f"pml-plugins checkpoints hold tensors and plain types only)"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError, KeyError, IndexError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{where} is corrupt and cannot be read ({_first_line(exc)})") from None
    return obj


def _zip_problem(path: Path) -> Optional[str]:
    """Why the zip archive is unreadable (None if it is fine): its directory and every CRC."""
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except zipfile.BadZipFile as exc:
        return _first_line(exc)
    except (OSError, EOFError, ValueError, NotImplementedError) as exc:
        return _first_line(exc)
    return f"member {bad!r} fails its CRC check" if bad else None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    if "weights_only" in line or "arbitrary code" in line:
        return type(exc).__name__
    return line[:200]


def is_resumable(state: Mapping) -> bool:
    """Whether a loaded checkpoint carries training state (not only the final weights)."""
    return state.get("format") == FORMAT and "epoch" in state


# -- modules ---------------------------------------------------------------------------------------
def load_module_state(
    module: torch.nn.Module, state: Mapping[str, torch.Tensor], what: str, source: str = "the checkpoint"
) -> None:
    """``module.load_state_dict(state)`` with one-line errors: missing / unexpected keys, or the
    first parameter whose shape differs (another loss, embedding size or backbone)."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
        if extra:
            parts.append(f"unexpected {', '.join(extra[:4])}{' ...' if len(extra) > 4 else ''}")
        raise ValueError(f"{source} does not fit this {what}: {'; '.join(parts)} (another loss or model?)")
    for key, value in own.items():
        saved = state[key]
        if not isinstance(saved, torch.Tensor) or tuple(saved.shape) != tuple(value.shape):
            shape = tuple(saved.shape) if isinstance(saved, torch.Tensor) else type(saved).__name__
            raise ValueError(
                f"{source} does not fit this {what}: {key} has shape {shape} in the checkpoint, "
                f"{tuple(value.shape)} here (another embedding size, loss or backbone?)"
            )
    module.load_state_dict(state)


# -- config ----------------------------------------------------------------------------------------
def config_diff(saved: Mapping[str, Any], current: Mapping[str, Any], ignore: tuple = RESUME_FREE_KEYS) -> list[str]:
    """``["lr: 0.001 (checkpoint) != 0.01 (now)", ...]`` for every setting that differs."""
    diffs = []
    for key in sorted(set(saved) | set(current)):
        if key in ignore or key == "resolved":
            continue
        a, b = saved.get(key), current.get(key)
        if _normalise(a) != _normalise(b):
            diffs.append(f"{key}: {a!r} (checkpoint) != {b!r} (now)")
    return diffs


def _normalise(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _normalise(v) for k, v in value.items()}
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    return repr(value)


def plain_config(cfg: Mapping[str, Any]) -> dict:
    """A config as JSON-like plain types (what ``weights_only=True`` loads): other values as repr."""
    return {str(k): _plain(v) for k, v in cfg.items()}


def _plain(value: Any) -> Any:
    if value is None:
        return None
    for kind in (bool, int, float, str):  # subclasses (torch's TorchVersion is a str) need pickle: plain them
        if isinstance(value, kind):
            return kind(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return repr(value)


def check_plain(obj: Any, where: str = "checkpoint") -> None:
    """Raise TypeError naming the first value ``weights_only=True`` could not load."""
    if (
        obj is None
        or type(obj) in (bool, int, float, str, bytes, torch.Size, torch.dtype, torch.device)
        or isinstance(obj, torch.Tensor)
    ):
        return
    if type(obj) in (list, tuple):
        for i, v in enumerate(obj):
            check_plain(v, f"{where}[{i}]")
        return
    if isinstance(obj, dict) and type(obj).__module__ in ("builtins", "collections"):
        for k, v in obj.items():
            check_plain(v, f"{where}[{k!r}]")
        return
    raise TypeError(
        f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}: a checkpoint holds tensors "
        f"and plain types only (a plugin's state_dict must return those)"
    )


def roundtrip_bytes(state: Mapping[str, Any]) -> dict:
    """Save and reload ``state`` in memory with ``weights_only=True`` (tests; plugin authors)."""
    buf = io.BytesIO()
    torch.save(dict(state), buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


__all__ = [
    "CHECKPOINT_NAME",
    "FORMAT",
    "RESUME_FREE_KEYS",
    "seed_all",
    "capture_rng_state",
    "restore_rng_state",
    "save_checkpoint",
    "load_checkpoint",
    "safe_torch_load",
    "checkpoint_path",
    "load_module_state",
    "config_diff",
    "plain_config",
    "check_plain",
    "is_resumable",
    "numbered_name",
    "roundtrip_bytes",
]
