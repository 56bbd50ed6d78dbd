"""Checkpoints: random states, atomic writes, --keep-last, safe loading with one-line errors,
evaluate RUN_DIR / embed RUN_DIR reproducing a run's numbers."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from pml_plugins.cli import main as cli_main
from pml_plugins.pipeline import checkpoint as ck

torch.set_num_threads(1)


def _draws() -> tuple:
    from pytorch_metric_learning.utils import common_functions as c_f

    pml = c_f.NUMPY_RANDOM
    return (
        torch.rand(5).tolist(),
        np.random.rand(5).tolist(),
        [random.random() for _ in range(5)],
        random.gauss(0, 1),
        np.random.randn(3).tolist(),
        pml.randint(0, 10**9, 4).tolist(),
    )


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    random.gauss(0, 1)  # leaves a cached Gaussian in Python's state
    np.random.randn()  # and in numpy's
    state = ck.capture_rng_state()
    expected = _draws()
    ck.check_plain(state)
    torch.save(state, tmp_path / "rng.pt")
    loaded = torch.load(tmp_path / "rng.pt", weights_only=True)
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    assert _draws() != expected
    ck.restore_rng_state(loaded)
    assert _draws() == expected


def test_pml_numpy_random_of_its_own_is_captured(monkeypatch):
    from pytorch_metric_learning.utils import common_functions as c_f

    monkeypatch.setattr(c_f, "NUMPY_RANDOM", np.random.RandomState(5))
    state = ck.roundtrip_bytes(ck.capture_rng_state())
    first = c_f.NUMPY_RANDOM.randint(0, 10**9, 6).tolist()
    c_f.NUMPY_RANDOM.seed(123)
    ck.restore_rng_state(state)
    assert c_f.NUMPY_RANDOM.randint(0, 10**9, 6).tolist() == first


def _state(epoch: int) -> dict:
    lin = torch.nn.Linear(3, 2)
    torch.nn.init.constant_(lin.weight, float(epoch))
    return {"format": ck.FORMAT, "epoch": epoch, "iteration": 0, "trunk": {}, "embedder": lin.state_dict()}


def test_save_is_atomic_and_keep_last_rotates(tmp_path):
    for epoch in range(1, 6):
        ck.save_checkpoint(_state(epoch), tmp_path, keep_last=3)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["checkpoint-epoch0003.pt", "checkpoint-epoch0004.pt", "checkpoint-epoch0005.pt", "checkpoint.pt"]
    assert ck.load_checkpoint(tmp_path)["epoch"] == 5
    assert ck.load_checkpoint(tmp_path / "checkpoint-epoch0004.pt")["embedder"]["weight"][0, 0] == 4.0
    # the default keeps the latest only
    other = tmp_path / "one"
    for epoch in range(1, 4):
        ck.save_checkpoint(_state(epoch), other)
    assert sorted(p.name for p in other.iterdir()) == ["checkpoint.pt"]
    with pytest.raises(ValueError, match="keep_last"):
        ck.save_checkpoint(_state(1), other, keep_last=0)


class _FailsToPickle:
    def __reduce__(self):
        raise RuntimeError("disk full (simulated by an object that cannot be saved)")


def test_a_write_that_dies_leaves_the_previous_checkpoint(tmp_path):
    ck.save_checkpoint(_state(1), tmp_path)
    before = (tmp_path / "checkpoint.pt").read_bytes()
    big = {**_state(2), "pad": torch.zeros(200_000), "z": _FailsToPickle()}
    with pytest.raises(RuntimeError, match="disk full"):
        ck.save_checkpoint(big, tmp_path)
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    assert ck.load_checkpoint(tmp_path)["epoch"] == 1


# -- bad checkpoints ---------------------------------------------------------------------------------
MARKER_NAME = "pwned"


class _Evil:
    """Unpickling this would create a file: the test checks it never is."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    good = tmp_path / "good.pt"
    torch.save({**_state(1), "pad": torch.arange(50_000, dtype=torch.float32)}, good)
    raw = good.read_bytes()
    files = {}
    files["truncated"] = tmp_path / "truncated.pt"
    files["truncated"].write_bytes(raw[: len(raw) // 2])
    corrupt = bytearray(raw)
    with zipfile.ZipFile(good) as zf:  # flip bytes inside the big tensor's data
        info = max(zf.infolist(), key=lambda i: i.compress_size)
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + 100
    corrupt[start : start + 64] = bytes(64)
    corrupt[start : start + 8] = b"\x01\x02\x03\x04\x05\x06\x07\x08"
    files["corrupt"] = tmp_path / "corrupt.pt"
    files["corrupt"].write_bytes(bytes(corrupt))
    files["random"] = tmp_path / "random.pt"
    files["random"].write_bytes(np.random.RandomState(0).bytes(5000))
    files["empty"] = tmp_path / "empty.pt"
    files["empty"].write_bytes(b"")
    files["pickle"] = tmp_path / "pickle.pt"
    torch.save({"trunk": {}, "embedder": {}, "evil": _Evil(str(tmp_path / MARKER_NAME))}, files["pickle"])
    files["not_a_checkpoint"] = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), files["not_a_checkpoint"])
    return files


EXPECTED = {
    "truncated": "truncated or corrupt",
    "corrupt": "truncated or corrupt",
    "random": "not a zip archive",
    "empty": "is empty",
    "pickle": "need pickle",
    "not_a_checkpoint": "not a pml-plugins checkpoint",
}


def test_every_bad_checkpoint_gets_one_clear_line(tmp_path):
    files = _bad_files(tmp_path)
    assert torch.load(tmp_path / "good.pt", weights_only=True)["epoch"] == 1
    for kind, path in files.items():
        with pytest.raises(ValueError) as info:
            ck.load_checkpoint(path)
        message = str(info.value)
        assert EXPECTED[kind] in message, (kind, message)
        assert "\n" not in message and "weights_only" not in message and "arbitrary code" not in message, message
    assert not (tmp_path / MARKER_NAME).exists()  # the pickled payload never ran
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ck.load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(FileNotFoundError, match="has no checkpoint.pt"):
        ck.load_checkpoint(tmp_path / "empty_run")


def test_load_module_state_names_the_mismatch():
    small, big = torch.nn.Linear(8, 4), torch.nn.Linear(8, 6)
    with pytest.raises(ValueError, match=r"weight has shape \(6, 8\) in the checkpoint, \(4, 8\) here"):
        ck.load_module_state(small, big.state_dict(), "embedding head")
    with pytest.raises(ValueError, match="missing bias"):
        ck.load_module_state(small, {"weight": small.weight.detach()}, "embedding head")
    ck.load_module_state(small, torch.nn.Linear(8, 4).state_dict(), "embedding head")


def test_config_diff_lists_every_differing_key():
    saved = {"lr": 0.001, "epochs": 3, "loss_args": {"margin": 0.1}, "out": "a", "ks": [1, 2], "resolved": {"x": 1}}
    now = {"lr": 0.01, "epochs": 3, "loss_args": {"margin": 0.2}, "out": "b", "ks": [1, 2], "resolved": {"x": 2}}
    diffs = ck.config_diff(saved, now)
    assert [d.split(":")[0] for d in diffs] == ["loss_args", "lr"]
    assert "0.001 (checkpoint) != 0.01 (now)" in diffs[1]
    assert ck.config_diff({"epochs": 3}, {"epochs": 3.0}) == []


def test_check_plain_names_an_object_that_needs_pickle():
    with pytest.raises(TypeError, match=r"checkpoint\['plugin'\]\['x'\] is a .*_Evil"):
        ck.check_plain({"plugin": {"x": _Evil("nowhere")}})


# -- the CLI on bad files and on a real run ----------------------------------------------------------
def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "pml_plugins", *args], check=False, capture_output=True, text=True, timeout=120, env=env
    )


def test_evaluate_on_bad_checkpoints_prints_one_line(tmp_path, capsys):
    files = _bad_files(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(
        json.dumps({"loss": "proxy_anchor", "dataset": "digits", "resolved": {"backbone": "cnn"}})
    )
    labels = tmp_path / "labels.npy"
    np.save(labels, np.zeros(3))
    for kind in ("truncated", "corrupt", "random", "empty", "pickle"):
        (run / "checkpoint.pt").write_bytes(files[kind].read_bytes())
        for args in (
            ["evaluate", str(run)],
            ["evaluate", "--embeddings", str(files[kind]), "--labels", str(labels)],
            ["embed", str(run), "--out", str(tmp_path / "e.npy")],
        ):
            capsys.readouterr()
            assert cli_main(args) == 2, (kind, args)
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1 and EXPECTED[kind] in err, (kind, err)
            assert "weights_only" not in err and "arbitrary code" not in err
    assert not (tmp_path / MARKER_NAME).exists()
    # as a user sees it: a real process, one line on stderr, no traceback
    (run / "checkpoint.pt").write_bytes(files["pickle"].read_bytes())
    proc = _cli("evaluate", str(run))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "need pickle" in proc.stderr and "Traceback" not in proc.stderr and "weights_only" not in proc.stderr
    assert not (tmp_path / MARKER_NAME).exists()
    assert cli_main(["evaluate", str(tmp_path / "no_such_run")]) == 2
    assert "run folder" in capsys.readouterr().err


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "pa"
    assert (
        cli_main(
            [
                "train",
                "--loss",
                "proxy_anchor",
                "--epochs",
                "1",
                "--iterations-per-epoch",
                "4",
                "--embedding-size",
                "16",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    return out


def test_evaluate_run_dir_reproduces_metrics_json_exactly(trained, capsys):
    capsys.readouterr()
    assert cli_main(["evaluate", str(trained), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    expected = json.loads((trained / "metrics.json").read_text())["metrics"]
    assert got["metrics"] == expected and got["distance"] == "cosine"
    assert cli_main(["evaluate", "--run", str(trained), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"] == expected
    # a euclidean ranking of the same embeddings is another number: the distance matters
    assert cli_main(["evaluate", str(trained), "--json", "--distance", "euclidean"]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"] != expected


def test_embed_writes_what_evaluate_ranks(trained, tmp_path, capsys):
    out = tmp_path / "emb.npy"
    assert cli_main(["embed", str(trained), "--out", str(out), "--no-progress"]) == 0
    emb, labels = np.load(out), np.load(tmp_path / "emb.labels.npy")
    assert emb.shape == (896, 16) and labels.shape == (896,)
    # an independent check: leave-one-out cosine 1-NN precision from the written files
    x = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    p_at_1 = float((labels[sim.argmax(1)] == labels).mean())
    expected = json.loads((trained / "metrics.json").read_text())["metrics"]["precision_at_1"]
    assert p_at_1 == pytest.approx(expected, abs=1.5 / len(labels))  # ties aside, the same neighbours
    assert (
        cli_main(
            [
                "embed",
                str(trained),
                "--out",
                str(tmp_path / "all.npy"),
                "--split",
                "all",
                "--normalize",
                "--no-progress",
            ]
        )
        == 0
    )
    allx = np.load(tmp_path / "all.npy")
    assert allx.shape == (1797, 16) and np.allclose(np.linalg.norm(allx, axis=1), 1, atol=1e-5)


def test_a_checkpoint_from_another_embedding_size_is_refused(trained, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    cfg = json.loads((run / "config.json").read_text())
    cfg["embedding_size"] = 32
    (run / "config.json").write_text(json.dumps(cfg))
    from pml_plugins.pipeline.run_dir import load_run

    with pytest.raises(
        ValueError, match=r"does not fit this embedding head: .*\(16, 64\) in the checkpoint, \(32, 64\)"
    ):
        load_run(run)
    assert cli_main(["evaluate", str(run)]) == 2
    err = capsys.readouterr().err
    assert "does not fit" in err and len(err.strip().splitlines()) == 1


def test_evaluate_run_dir_follows_the_runs_query_gallery_protocol(tmp_path, capsys):
    """A run evaluated query-vs-gallery (--query/--gallery) is re-evaluated the same way."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x, y = (digits.data / 16).astype(np.float32), digits.target
    train, test = y < 5, y >= 5
    xt, yt = x[test], y[test]
    half = np.arange(len(yt)) % 2 == 0
    np.savez(tmp_path / "train.npz", features=x[train], labels=y[train])
    np.savez(tmp_path / "q.npz", features=xt[half], labels=yt[half])
    np.savez(tmp_path / "g.npz", features=xt[~half], labels=yt[~half])
    out = tmp_path / "run"
    args = [
        "train",
        "--loss",
        "proxy_anchor",
        "--dataset",
        f"embeddings:{tmp_path / 'train.npz'}",
        "--epochs",
        "1",
        "--iterations-per-epoch",
        "3",
        "--embedding-size",
        "16",
        "--no-progress",
    ]
    assert (
        cli_main([*args, "--query", str(tmp_path / "q.npz"), "--gallery", str(tmp_path / "g.npz"), "--out", str(out)])
        == 0
    )
    capsys.readouterr()
    assert cli_main(["evaluate", str(out), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["metrics"]
    assert got == json.loads((out / "metrics.json").read_text())["metrics"]
    # the same model queried leave-one-out in its own test split gives other numbers
    assert cli_main(["evaluate", str(out), "--json", "--data", f"embeddings:{tmp_path / 'train.npz'}"]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"] != got
