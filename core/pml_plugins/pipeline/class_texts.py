"""Class distances from class texts, for losses whose registration says they take them.

A loss's :class:`~pml_plugins.LossSpec` says ``needs_class_distances=True`` and gives
``class_distances_from_texts=fn`` (``fn(texts) -> (C, C)`` distances in [0, 1], e.g. the
adaptive-margin plugin's sentence-model embedding); the main job then builds one text per
training class and passes ``class_distances=`` to the loss:

* ``--class-texts FILE`` (or ``class_texts`` in a config): a JSON object ``{"class": "text"}``,
  a JSON list (text i for training class i), or a CSV of ``class,text`` rows (a ``class,text``
  header is skipped);
* otherwise ImageFolder data use their folder names and the bundled digits the digit names.

The core never imports the plugin: the callable is all it knows. The distances used are written
to the run folder as ``class_distances.npy`` and ``class_distances.json`` (classes, texts, where
they came from, the matrix).
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
#: the LossSpec fields this module reads
NEEDS_KEY, FROM_TEXTS_KEY = "needs_class_distances", "class_distances_from_texts"
#: loss arguments through which a user gives distances (or texts) directly
USER_KEYS = ("class_distances", "class_texts")


def spec_field(spec: Any, name: str, default: Any = None) -> Any:
    """A field of a registry spec (or of a plain mapping, as tests and old callers pass)."""
    if isinstance(spec, Mapping):
        return spec.get(name, default)
    return getattr(spec, name, default)


def needs_class_distances(spec: Any) -> bool:
    """Whether the loss's spec says it takes class distances."""
    return bool(spec_field(spec, NEEDS_KEY, False))


def read_class_texts(path: str) -> dict[str, str] | list[str]:
    """A class -> text mapping (dict) or a list (text i for training class i) from JSON or CSV."""
    file = Path(os.path.expanduser(path))
    if not file.is_file():
        raise FileNotFoundError(
            f"class texts file {str(file)!r} does not exist (see --class-texts: a JSON object "
            f"class -> text, a JSON list, or a CSV of class,text rows)"
        )
    if file.suffix.lower() == ".csv":
        with open(file, newline="", encoding="utf-8") as fh:
            rows = [r for r in csv.reader(fh) if r and any(c.strip() for c in r)]
        if rows and [c.strip().lower() for c in rows[0][:2]] == ["class", "text"]:
            rows = rows[1:]
        bad = [i for i, r in enumerate(rows) if len(r) < 2]
        if bad:
            raise ValueError(f"{file}: CSV rows must be class,text; rows {bad[:5]} are not")
        return {r[0].strip(): ",".join(r[1:]).strip() for r in rows}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{file}: invalid JSON: {exc} (use a .csv suffix for class,text rows)") from None
    if isinstance(data, dict):
        return {str(k): v for k, v in data.items()}
    if isinstance(data, list):
        return data
    raise ValueError(f"{file}: expected a JSON object class -> text or a list of texts, got {type(data).__name__}")


def _text(value: Any, where: str) -> str:
    if isinstance(value, (list, tuple)):  # e.g. several description sentences
        value = " ".join(str(v) for v in value)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: every class text must be a non-empty string, got {value!r}")
    return value.strip()


def class_texts_for(
    train_classes: Sequence[Any], *, dataset_kind: str, class_texts: Optional[str] = None
) -> tuple[list[str], str]:
    """One text per training class (in label order 0..C-1) and where the texts came from."""
    if class_texts is not None:
        data = read_class_texts(class_texts)
        where = f"--class-texts {class_texts}"
        if isinstance(data, list):
            if len(data) != len(train_classes):
                raise ValueError(
                    f"{where}: a list needs one text per training class ({len(train_classes)}), got {len(data)}"
                )
            return [_text(t, where) for t in data], f"file {class_texts}"
        missing = [str(c) for c in train_classes if str(c) not in data]
        if missing:
            raise ValueError(
                f"{where}: no text for {len(missing)} of the {len(train_classes)} training classes, e.g. {missing[:5]}"
            )
        return [_text(data[str(c)], where) for c in train_classes], f"file {class_texts}"
    if dataset_kind == "digits":
        return [DIGIT_NAMES[int(c)] for c in train_classes], "the digit names"
    if dataset_kind == "imagefolder":
        return [str(c).replace("_", " ") for c in train_classes], "the ImageFolder class folder names"
    raise ValueError(
        f"this loss takes class distances from class texts, and a {dataset_kind} dataset has no "
        f"class names to use: give --class-texts FILE (JSON class -> text, or CSV class,text)"
    )


def describe_source(dataset_kind: str, class_texts: Optional[str] = None) -> str:
    """Where a run's class distances come from, in a few words (for table labels)."""
    if class_texts is not None:
        return f"text of {os.path.basename(class_texts)}"
    return {"digits": "text of the digit names", "imagefolder": "text of the folder names"}.get(
        dataset_kind, "class texts"
    )


def class_distances_for_run(
    spec: Any,
    loss_args: dict,
    *,
    train_classes: Sequence[Any],
    dataset_kind: str,
    class_texts: Optional[str],
    out: Optional[str],
) -> tuple[dict, Optional[dict]]:
    """The loss arguments with ``class_distances`` added (when the loss takes them and the user gave
    none), and what was done for ``config.json`` (None when nothing was)."""
    if not needs_class_distances(spec):  # --class-texts is ignored (compare passes it to every loss)
        return loss_args, None
    given = [k for k in USER_KEYS if loss_args.get(k) is not None]
    if given:
        return loss_args, {"source": f"loss argument {given[0]}"}
    from_texts = spec_field(spec, FROM_TEXTS_KEY)
    if not callable(from_texts):
        raise TypeError(
            f"the loss's spec says {NEEDS_KEY}=True but gives no callable {FROM_TEXTS_KEY}; pass "
            f"class_distances as a loss argument"
        )
    texts, source = class_texts_for(train_classes, dataset_kind=dataset_kind, class_texts=class_texts)
    distances = np.asarray(_to_numpy(from_texts(texts)), dtype=np.float32)
    if distances.shape != (len(texts), len(texts)):
        raise ValueError(f"{FROM_TEXTS_KEY} returned shape {distances.shape}, expected {(len(texts), len(texts))}")
    info = {
        "source": f"text embeddings of {source}",
        "texts_from": source,
        "model": str(spec_field(spec, "class_text_model") or "the loss's text model"),
        "num_classes": len(texts),
    }
    value: Any = distances
    if out is not None:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / "class_distances.npy", distances)
        record = {**info, "classes": [str(c) for c in train_classes], "texts": texts, "distances": distances.tolist()}
        (folder / "class_distances.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        value = str(folder / "class_distances.npy")  # config.json shows the file, not a C x C matrix
        info["file"] = value
    return {**loss_args, "class_distances": value}, info


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)
