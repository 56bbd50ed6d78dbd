"""Shared fixtures: the example plugin packages, pip-installed into a private folder."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import pml_plugins
from pml_plugins import registry as reg

EXAMPLES = Path(__file__).parent / "example_plugins"


@pytest.fixture(scope="session")
def example_plugins_site(tmp_path_factory) -> Path:
    """A folder with the three example plugins installed by pip (real dist-info and entry points).

    Installed with ``--target`` rather than into the environment, so a developer's
    ``pml-plugins list`` never shows the deliberately broken test plugins afterwards.
    """
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--disable-pip-version-check",
            "--target",
            str(target),
            str(EXAMPLES / "good"),
            str(EXAMPLES / "broken"),
            str(EXAMPLES / "colliding"),
        ],
        check=True,
    )
    return target


@pytest.fixture
def fresh_registry():
    """Start every registry test from an empty registry, and leave none behind."""
    reg.registry.reset()
    yield reg.registry
    reg.registry.reset()


@pytest.fixture
def with_example_plugins(example_plugins_site, monkeypatch, fresh_registry):
    """The example plugins visible to entry-point discovery in this process."""
    monkeypatch.syspath_prepend(str(example_plugins_site))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the broken plugin warns; tested separately
        pml_plugins.load_plugins(reload=True)
    yield example_plugins_site


@pytest.fixture
def run_cli():
    """``run_cli(*args, pythonpath=None, env=None)`` runs ``python -m pml_plugins ARGS`` in a subprocess."""
    return _run_cli


def _run_cli(*args: str, pythonpath: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = dict(os.environ, **(env or {}))
    if pythonpath is not None:
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(pythonpath), environment.get("PYTHONPATH", "")]))
    return subprocess.run(
        [sys.executable, "-m", "pml_plugins", *args], capture_output=True, text=True, env=environment, timeout=300
    )


def build_report_run(out: Path, dims: int = 16, distance: str = "cosine") -> dict:
    """A run folder for the report from real data: the digits test split (unseen classes 5-9)
    embedded by a PCA fitted on the training split; metrics.json from PML's accuracy
    calculator, a three-epoch metrics.jsonl, and test_embeddings.npz with thumbnails."""
    import json

    import numpy as np
    import torch
    from sklearn.decomposition import PCA

    from pml_plugins.pipeline.data import load_data
    from pml_plugins.pipeline.evaluate import make_accuracy_calculator, standard_metric_name
    from pml_plugins.report import append_metrics_line, make_thumbnails, save_test_artifacts, thumbnail_sample

    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    splits = load_data("digits")
    flat = lambda ds: ds.x.reshape(len(ds), -1).numpy()
    emb = PCA(dims, random_state=0).fit(flat(splits.train)).transform(flat(splits.test)).astype(np.float32)
    queries = torch.as_tensor(emb)
    if distance == "cosine":
        queries = torch.nn.functional.normalize(queries, dim=1)
    calculator = make_accuracy_calculator((1, 2, 4, 8), distance)
    accuracies = calculator.get_accuracy(queries, torch.as_tensor(splits.test_labels))
    metrics = {standard_metric_name(k): float(v) for k, v in accuracies.items()}
    name = f"pca{dims}"
    (out / "metrics.json").write_text(json.dumps({"name": name, "metrics": metrics, "seconds_per_epoch": 0.1}))
    resolved = {"name": name, "retrieval_distance": distance, "versions": {"torch": torch.__version__}}
    config = {"loss": name, "dataset": "digits", "epochs": 3, "seed": 0, "resolved": resolved}
    (out / "config.json").write_text(json.dumps(config))
    for epoch in range(1, 4):
        append_metrics_line(out, {"epoch": epoch, "loss": 1.0 / epoch, "lr": {"trunk": 1e-3 / epoch}, "seconds": 0.1})
    rows = thumbnail_sample(len(splits.test_labels))
    save_test_artifacts(
        out,
        emb,
        splits.test_labels,
        make_thumbnails(splits.test, rows),
        thumbnail_index=rows,
        class_names=splits.test_classes,
        retrieval_distance=distance,
    )
    return {
        "embeddings": emb,
        "labels": splits.test_labels,
        "metrics": metrics,
        "name": name,
        "class_names": [str(c) for c in splits.test_classes],
    }


@pytest.fixture(scope="session")
def report_run(tmp_path_factory) -> tuple[Path, dict]:
    """``(run folder with report.html, what went in)`` for the report tests (a few seconds)."""
    from pml_plugins.report import write_report

    out = tmp_path_factory.mktemp("report") / "run"
    info = build_report_run(out)
    write_report(out)
    return out, info


@pytest.fixture(scope="session")
def report_run_builder():
    """:func:`build_report_run`, for tests that make run folders of their own."""
    return build_report_run


def parse_html_tags(text: str) -> list[tuple[str, dict]]:
    """Every start tag of ``text`` with its attributes, in order."""
    from html.parser import HTMLParser

    tags: list[tuple[str, dict]] = []

    class _Tags(HTMLParser):
        def handle_starttag(self, tag, attrs):
            tags.append((tag, dict(attrs)))

    _Tags().feed(text)
    return tags


def check_self_contained(text: str) -> list[tuple[str, dict]]:
    """No script, no stylesheet or font link, no URL leaving the page; every image a valid PNG/SVG."""
    import base64
    import io
    import re

    from PIL import Image

    tags = parse_html_tags(text)
    assert not [t for t, _ in tags if t in ("script", "link", "iframe", "object", "embed", "base")]
    assert not re.search(r"@import|url\(", text), "CSS must not reference anything"
    for tag, attrs in tags:
        for key in ("src", "href", "srcset", "data", "poster", "action"):
            value = attrs.get(key)
            if value is None:
                continue
            assert not re.match(r"^\s*([a-z][a-z0-9+.-]*:|//)", value, re.I) or value.startswith("data:image/"), (
                f"<{tag} {key}={value[:80]!r}> leaves the page"
            )
            assert not value.startswith("/"), f"absolute path {value!r}"
    images = [a for t, a in tags if t == "img"]
    assert images
    for attrs in images:
        src = attrs["src"]
        assert attrs.get("alt"), "every image has an alt text"
        if src.startswith("data:image/png;base64,"):
            data = base64.b64decode(src.split(",", 1)[1], validate=True)
            assert data[:8] == b"\x89PNG\r\n\x1a\n"
            with Image.open(io.BytesIO(data)) as im:
                im.verify()
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                assert im.width > 0 and im.height > 0
        else:
            assert src.startswith("data:image/svg+xml"), src[:40]
    return tags


@pytest.fixture(scope="session")
def report_html_checker():
    """:func:`check_self_contained`: asserts an HTML report is offline-safe; returns its tags."""
    return check_self_contained


@pytest.fixture
def digits_features(tmp_path) -> Path:
    """scikit-learn's digits as an ``embeddings:`` ``.npz`` (identity backbone: no BatchNorm, so one
    process and DDP with the same global batch give the same numbers)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    path = tmp_path / "digits.npz"
    np.savez(path, features=(digits.data / 16).astype(np.float32), labels=digits.target)
    return path


@pytest.fixture
def torchrun_two():
    """``run(command, args, env=None)``: ``torchrun --standalone --nproc-per-node 2 -m pml_plugins
    COMMAND --distributed ARGS`` in a subprocess, outside any torchrun environment of this one."""
    from pml_plugins.distributed_losses import TORCHRUN_ENV

    def run(command: str, args: list[str], env: dict | None = None, timeout: int = 300):
        env = env if env is not None else {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
        return subprocess.run(
            [*cmd, "-m", "pml_plugins", command, "--distributed", *args],
            check=False,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )

    return run
