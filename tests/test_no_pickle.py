"""No pickle: iota's source never (un)pickles, ruff refuses it, and every process a test starts runs under a guard
that makes unpickling raise; a whole local network trains under that guard."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NOPICKLE_DIR = REPO / "tests" / "support" / "nopickle"  # put on PYTHONPATH by tests/conftest.py
IOTA = REPO / "iota"
GUARD_MESSAGE = "iota no-pickle guard: unpickling is forbidden"

# Modules that serialise arbitrary objects: loading what they write runs code chosen by the writer.
BANNED_MODULES = {
    "pickle",
    "_pickle",
    "cPickle",
    "dill",
    "cloudpickle",
    "joblib",
    "shelve",
    "marshal",
    "copyreg",
}
# Calls that pickle under another name.
BANNED_CALLS = {"torch.load", "torch.save", "torch.serialization.load", "torch.serialization.save"}
BANNED_METHODS = {"read_pickle", "to_pickle"}  # pandas


def pickle_uses(path: Path) -> list[str]:
    """Every import of a pickling module, torch.load/torch.save, pandas pickles and allow_pickle=True."""
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        where = f"{path.name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [
                f"{where} import {a.name}" for a in node.names if a.name.split(".")[0] in BANNED_MODULES
            ]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] in BANNED_MODULES:
                found.append(f"{where} from {node.module} import ...")
            names = {f"{node.module}.{a.name}" for a in node.names}
            found += [f"{where} from {node.module} import {n}" for n in sorted(names & BANNED_CALLS)]
        elif isinstance(node, ast.Attribute):
            dotted = ast.unparse(node)
            if dotted in BANNED_CALLS or node.attr in BANNED_METHODS:
                found.append(f"{where} {dotted}")
        elif isinstance(node, ast.Call):
            for keyword in node.keywords:
                if keyword.arg == "allow_pickle" and not (
                    isinstance(keyword.value, ast.Constant) and keyword.value.value is False
                ):
                    found.append(f"{where} allow_pickle={ast.unparse(keyword.value)}")
            # __import__("pickle") / importlib.import_module("pickle")
            first = node.args[0] if node.args else None
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                callee = ast.unparse(node.func)
                if callee.endswith(("import_module", "__import__")) and first.value in BANNED_MODULES:
                    found.append(f"{where} {callee}({first.value!r})")
    return found


def test_iota_never_pickles() -> None:
    offenders = [use for path in sorted(IOTA.rglob("*.py")) for use in pickle_uses(path)]
    assert not offenders, "tensors travel as safetensors; nothing is pickled"


def test_the_source_check_catches_every_form(tmp_path: Path) -> None:
    source = tmp_path / "bad.py"
    source.write_text(
        "import pickle\nimport dill as d\nfrom _pickle import loads\nimport torch\nfrom torch import load\n"
        "import numpy as np\nimport importlib\n"
        "torch.load('w.pt')\ntorch.save({}, 'w.pt')\nnp.load('a.npy', allow_pickle=True)\n"
        "np.load('b.npy', allow_pickle=False)\nimportlib.import_module('pickle')\nframe.to_pickle('f')\n"
    )
    uses = pickle_uses(source)
    assert len(uses) == 9, uses


def ruff() -> str:
    found = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if found is None:
        pytest.fail("ruff is not installed: bash setup.sh dev")
    return found


def test_ruff_refuses_pickle_and_torch_load(tmp_path: Path) -> None:
    # The lint rules in pyproject.toml are the first line of defence; prove they fire on each banned form.
    source = tmp_path / "uses_pickle.py"
    source.write_text(
        'import pickle\nimport torch\n\nx = pickle.loads(b"")\ny = torch.load("w.pt")\ntorch.save(x, "w.pt")\n'
    )
    result = subprocess.run(
        [
            ruff(),
            "check",
            "--no-cache",
            "--config",
            str(REPO / "pyproject.toml"),
            "--output-format",
            "concise",
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout.count("TID251") >= 3, result.stdout  # pickle import, torch.load, torch.save
    assert "S301" in result.stdout, result.stdout


# -- the guard ---------------------------------------------------------------------------------------------------


def child_env(**extra: str) -> dict[str, str]:
    """What iota/local.py gives a role: the parent's environment without its IOTA_* settings, plus its own."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("IOTA_")}, **extra}


def run_child(code: str, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], env=child_env(**extra), capture_output=True, text=True, timeout=120
    )


def test_the_session_puts_the_guard_on_pythonpath() -> None:
    assert os.environ["PYTHONPATH"].split(os.pathsep)[0] == str(NOPICKLE_DIR)


def test_a_child_process_has_the_guard() -> None:
    shown = run_child("import sitecustomize; print(sitecustomize.IOTA_NO_PICKLE, sitecustomize.__file__)")
    assert shown.returncode == 0, shown.stderr
    flag, where = shown.stdout.split()
    assert flag == "True" and Path(where).parent == NOPICKLE_DIR
    assert shown.stderr == ""  # the guard prints nothing


@pytest.mark.parametrize(
    "code",
    [
        "import pickle; pickle.loads(pickle.dumps(1))",
        "import pickle, io; pickle.load(io.BytesIO(pickle.dumps(1)))",
        "import pickle, io; pickle.Unpickler(io.BytesIO(pickle.dumps(1))).load()",
        "import _pickle; _pickle.loads(b'')",
        "import multiprocessing.reduction as r, pickle; r.ForkingPickler.loads(pickle.dumps(1))",
        "import io, torch; b = io.BytesIO(); torch.save(torch.ones(2), b); b.seek(0); torch.load(b)",
        "import io, torch.serialization as s; s.load(io.BytesIO())",
    ],
    ids=["loads", "load", "Unpickler", "_pickle", "multiprocessing", "torch.load", "torch.serialization"],
)
def test_the_guard_makes_unpickling_raise(code: str) -> None:
    result = run_child(code)
    assert result.returncode != 0
    assert GUARD_MESSAGE in result.stderr, result.stderr


def test_the_guard_records_a_refusal_a_library_swallowed(tmp_path: Path) -> None:
    # A library may catch the error and carry on; the marker file still shows the attempt.
    result = run_child(
        "import pickle\ntry:\n    pickle.loads(pickle.dumps(1))\nexcept RuntimeError:\n    pass\n",
        NOPICKLE_MARKER_DIR=str(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    (marker,) = tmp_path.glob("*.json")
    record = json.loads(marker.read_text())
    assert [r["what"] for r in record["refused"]] == ["pickle.loads"]


@pytest.mark.slow
def test_a_local_network_trains_under_the_guard(tmp_path: Path, data_dir: Path) -> None:
    markers = tmp_path / "markers"
    report_path = tmp_path / "report.json"
    command = [
        sys.executable, "-m", "iota", "local", "--preset", "test", "--miners-per-stage", "1", "--epochs", "1",
        "--samples-per-epoch", "4", "--micro-batch", "2", "--no-baseline", "--run-dir", str(tmp_path / "run"),
        "--data-dir", str(data_dir), "--report", str(report_path),
    ]  # fmt: skip
    result = subprocess.run(
        command,
        cwd=tmp_path,  # no .env here: the run uses its own settings only
        env=child_env(NOPICKLE_MARKER_DIR=str(markers)),
        capture_output=True,
        text=True,
        timeout=280,
    )
    logs = "\n".join(p.read_text()[-2000:] for p in sorted((tmp_path / "run" / "logs").glob("*.log")))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:] + logs
    report = json.loads(report_path.read_text())
    assert report["samples_lost"] == 0 and report["samples_completed"] >= 4
    assert report["epochs_completed"] >= 1 and report["checkpoint"]

    records = [json.loads(p.read_text()) for p in markers.glob("*.json")]
    roles = sorted(r["argv"][r["argv"].index("iota") + 1] for r in records if "iota" in r["argv"])
    assert roles == ["local", "miner", "miner", "miner", "orchestrator", "validator"], records
    refused = [(r["argv"], r["refused"]) for r in records if r["refused"]]
    assert not refused, "a process of the run tried to unpickle"
