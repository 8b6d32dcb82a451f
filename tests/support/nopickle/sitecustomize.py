"""Test guard: any Python process with this folder on PYTHONPATH refuses to unpickle (and to torch.load).

Python imports `sitecustomize` at start-up, before any user code, so every `python -m iota <role>` a test starts
(tests/conftest.py prepends this folder to PYTHONPATH) runs with unpickling replaced by an error. iota never
unpickles; a library doing so on iota's behalf would surface here as a failing run instead of passing silently.

The guard prints nothing. It is detectable: `sitecustomize.IOTA_NO_PICKLE` is True, and when NOPICKLE_MARKER_DIR is
set (a name without the IOTA_ prefix, so `iota local` passes it on to its children) each guarded process writes
`<pid>.json` there with its command line, and the stack of any unpickling it refused (even one a library swallowed).
Dumping stays allowed: a pickle that is never loaded carries nothing across a process boundary.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn

IOTA_NO_PICKLE = True
MESSAGE = "iota no-pickle guard: unpickling is forbidden in iota processes ({what})"

_HERE = str(Path(__file__).resolve().parent)
_refused: list[dict[str, Any]] = []


def _marker_path() -> Path | None:
    # The environment is read here on purpose: this is test tooling, not iota, and it has no caller to ask.
    directory = os.environ.get("NOPICKLE_MARKER_DIR")
    return Path(directory) / f"{os.getpid()}.json" if directory else None


def _write_marker() -> None:
    path = _marker_path()
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"pid": os.getpid(), "argv": sys.orig_argv, "refused": _refused}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    tmp.replace(path)  # atomic, so a reader never sees half a record


def _refuse(what: str) -> NoReturn:
    _refused.append({"what": what, "stack": traceback.format_stack(limit=12)[:-1]})
    try:
        _write_marker()
    except OSError:
        pass  # the marker is a convenience for tests; the refusal below is what matters
    raise RuntimeError(MESSAGE.format(what=what))


def _refusing(what: str) -> Any:
    def refuse(*args: Any, **kwargs: Any) -> NoReturn:
        _refuse(what)

    refuse.__name__ = what.rsplit(".", 1)[-1]
    refuse.__qualname__ = refuse.__name__
    return refuse


def _guard_pickle() -> None:
    import _pickle
    import pickle  # noqa: TID251 (this is the guard: it replaces what iota must never call)

    class GuardedUnpickler(pickle.Unpickler):  # type: ignore[misc]
        """Subclassable (libraries subclass Unpickler at import), but never able to load."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            _refuse("pickle.Unpickler")

        def load(self) -> NoReturn:
            _refuse("pickle.Unpickler.load")

    for module in (pickle, _pickle):
        module.loads = _refusing(f"{module.__name__}.loads")  # type: ignore[attr-defined]
        module.load = _refusing(f"{module.__name__}.load")  # type: ignore[attr-defined]
        module.Unpickler = GuardedUnpickler  # type: ignore[attr-defined,misc]
    # The pure-Python implementations, which pickle keeps under underscored names.
    pickle._loads = _refusing("pickle._loads")  # type: ignore[attr-defined]
    pickle._load = _refusing("pickle._load")  # type: ignore[attr-defined]
    pickle._Unpickler = GuardedUnpickler  # type: ignore[attr-defined,misc,assignment]


def _guard_torch(torch: ModuleType) -> None:
    # torch.load has its own (weights-only) unpickler that bypasses the pickle module, so it is refused by name.
    refuse = _refusing("torch.load")
    torch.load = refuse  # type: ignore[attr-defined]
    serialization = sys.modules.get("torch.serialization")
    if serialization is not None:
        serialization.load = refuse  # type: ignore[attr-defined]


class _TorchWatcher(importlib.abc.MetaPathFinder):
    """Patches torch.load right after torch is imported: importing torch here would slow every process."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if name != "torch":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        original = loader.exec_module

        def exec_module(module: ModuleType) -> None:
            original(module)
            _guard_torch(module)

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def _chain_next_sitecustomize() -> None:
    """This file shadows any other sitecustomize (a distribution's, a venv's): run that one too."""
    others = [p for p in sys.path if p and str(Path(p).resolve()) != _HERE]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", others)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)


def install() -> None:
    _guard_pickle()
    if "torch" in sys.modules:
        _guard_torch(sys.modules["torch"])
    else:
        sys.meta_path.insert(0, _TorchWatcher())
    try:
        _write_marker()
    except OSError:
        pass  # as above: a missing marker makes the test that looks for it fail, with a clear reason


install()
_chain_next_sitecustomize()
