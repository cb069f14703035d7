"""A guard for shared fixtures: no test may change what a module- or session-scoped fixture holds.

A shared fixture is built once and read by every later test of its module (or session), so
a test that writes into it — a run directory's stores, a model folder, a module's weights
or hooks, an array — makes the later tests depend on the order they run in. Every shared
fixture's value is fingerprinted when it is built, and again after each test that used
it (before that test's teardown); a difference fails the test loudly at teardown, naming
the fixture and what changed. A test that needs to change a shared fixture works on its
own copy (e.g. ``shutil.copytree`` of the run directory into ``tmp_path``).

What a fingerprint covers:

* paths (also inside configs, tuples, dicts and hmine's own objects): every file and
  folder under them, with sizes and modification times;
* torch modules: the state dict's bytes, the hooks registered on any submodule, the train
  / eval mode, and the top module's plain public attributes;
* tensors, arrays and data frames: their bytes;
* pydantic models, dataclasses and objects of hmine's and the tests' own classes: their
  public attributes, recursively (not ``functools.cached_property`` values: those are
  caches filled on first use). Objects of other libraries (tokenizers, schedulers) are
  not looked into: their caches change when they are used.

Registered in ``conftest.py`` by importing the two hooks below.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from pathlib import Path

import numpy as np
import pytest

SHARED_SCOPES = {"session", "package", "module", "class"}
_MAX_DEPTH = 4
_baselines: dict[tuple[str, int], tuple[object, object]] = {}  # (name, id(value)) -> (value, fingerprint)


def _digest(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def _tree(path: Path) -> tuple:
    """(relative path, size, mtime_ns) of a file, or of every file and folder under a folder."""
    if not path.exists():
        return ("missing",)
    if path.is_file():
        stat = path.stat()
        return (("", stat.st_size, stat.st_mtime_ns),)
    entries = []
    for folder, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files) + [d + "/" for d in dirs]:
            full = Path(folder) / name.rstrip("/")
            try:
                stat = full.stat()
            except FileNotFoundError:
                continue
            size = stat.st_size if not name.endswith("/") else -1
            entries.append((str(full.relative_to(path)) + ("/" if name.endswith("/") else ""), size, stat.st_mtime_ns))
    return tuple(entries)


def _tensor_digest(tensor) -> tuple:
    import torch

    flat = tensor.detach().cpu().contiguous().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    data = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
    return ("tensor", ("shape", tuple(tensor.shape)), ("dtype", str(tensor.dtype)), ("bytes", _digest(data)))


def _module_state(module) -> tuple:
    digest = hashlib.sha1()
    for name, value in module.state_dict().items():
        digest.update(name.encode())
        digest.update(_tensor_digest(value)[3][1].encode())
    hooks = sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in module.modules()
    )
    modes = tuple(m.training for m in module.modules())
    plain = {
        k: v for k, v in vars(module).items()
        if not k.startswith("_") and isinstance(v, (int, float, str, bool, tuple, dict, type(None)))
    }  # fmt: skip
    return (
        "module", ("class", type(module).__name__), ("weights", digest.hexdigest()), ("hooks", hooks),
        ("train modes", modes), ("attributes", fingerprint(plain)),
    )  # fmt: skip


def _own_class(value) -> bool:
    module = type(value).__module__ or ""
    return module.split(".")[0] in {"hmine", "flows"} or module.startswith("test_") or module == "conftest"


def fingerprint(value, depth: int = 0):
    """A comparable summary of what ``value`` holds (see the module docstring)."""
    import torch

    if depth > _MAX_DEPTH:
        return ("deep", type(value).__name__)
    if isinstance(value, Path):
        return ("path", str(value), _tree(value))
    if isinstance(value, (str, int, float, bool, bytes, type(None))):
        return value
    if isinstance(value, torch.nn.Module):
        return _module_state(value)
    if torch.is_tensor(value):
        return _tensor_digest(value)
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            return ("array", value.shape, tuple(fingerprint(v, depth + 1) for v in value.ravel()))
        return ("array", ("shape", value.shape), ("dtype", str(value.dtype)), ("bytes", _digest(np.ascontiguousarray(value).tobytes())))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(fingerprint(v, depth + 1) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple((str(k), fingerprint(v, depth + 1)) for k, v in value.items()))
    import pandas as pd
    from pydantic import BaseModel

    if isinstance(value, (pd.DataFrame, pd.Series)):
        return ("frame", ("bytes", _digest(pd.util.hash_pandas_object(value, index=True).to_numpy().tobytes())), ("dtypes", repr(value.dtypes)))
    if isinstance(value, BaseModel):
        fields = {k: getattr(value, k) for k in type(value).model_fields}
        return (type(value).__name__, fingerprint(fields, depth + 1))
    if dataclasses.is_dataclass(value) or _own_class(value):
        attrs = {
            k: v for k, v in vars(value).items()
            if not k.startswith("_") and not callable(v) and not _lazy(type(value), k)
        }  # fmt: skip
        return (type(value).__name__, fingerprint(attrs, depth + 1))
    return ("opaque", type(value).__name__)


def _differences(before, after, where: str = "") -> list[str]:
    """Human-readable differences between two fingerprints (the first few)."""
    if before == after:
        return []
    if isinstance(before, tuple) and isinstance(after, tuple) and before[:1] == after[:1] == ("path",):
        old = {entry[0]: entry[1:] for entry in before[2] if len(entry) == 3}
        new = {entry[0]: entry[1:] for entry in after[2] if len(entry) == 3}
        root = before[1]
        lines = [f"{root}/{p}: removed" for p in sorted(old.keys() - new.keys())]
        lines += [f"{root}/{p}: added" for p in sorted(new.keys() - old.keys())]
        lines += [f"{root}/{p}: rewritten" for p in sorted(old.keys() & new.keys()) if old[p] != new[p]]
        return lines or [f"{root}: changed"]
    if _labelled(before) and _labelled(after) and before[0] == after[0] == "dict":
        old, new = dict(before[1]), dict(after[1])
        lines = [f"{where}[{k!r}]: removed" for k in old.keys() - new.keys()]
        lines += [f"{where}[{k!r}]: added" for k in new.keys() - old.keys()]
        for k in old.keys() & new.keys():
            lines += _differences(old[k], new[k], f"{where}.{k}".lstrip("."))
        return lines
    if _labelled(before) and _labelled(after) and before[0] == after[0]:
        return _differences(before[1], after[1], where if before[0][:1].isupper() else f"{where}.{before[0]}".lstrip("."))
    if isinstance(before, tuple) and isinstance(after, tuple) and len(before) == len(after):
        lines = []
        for i, (b, a) in enumerate(zip(before, after)):
            lines += _differences(b, a, where if _labelled(b) else f"{where}[{i}]")
        return lines
    return [f"{where or 'value'}: {str(before)[:120]} -> {str(after)[:120]}"]


def _lazy(cls, name: str) -> bool:
    """A ``functools.cached_property``: its value is a cache filled on first use, not state."""
    return isinstance(getattr(cls, name, None), functools.cached_property)


def _labelled(part) -> bool:
    return isinstance(part, tuple) and len(part) == 2 and isinstance(part[0], str)


def _shared_fixture_values(item) -> dict[str, object]:
    infos = getattr(item, "_fixtureinfo", None)
    values = getattr(item, "funcargs", {})
    shared = {}
    for name, definitions in (infos.name2fixturedefs.items() if infos else ()):
        if definitions and definitions[-1].scope in SHARED_SCOPES and name in values:
            shared[name] = values[name]
    return shared


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef, request):
    value = yield
    if fixturedef.scope in SHARED_SCOPES:
        _baselines[(fixturedef.argname, id(value))] = (value, fingerprint(value))
    return value


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    changed = []
    for name, value in _shared_fixture_values(item).items():
        key = (name, id(value))
        if key not in _baselines or _baselines[key][0] is not value:
            continue
        now = fingerprint(value)
        lines = _differences(_baselines[key][1], now)
        if lines:
            changed.append(f"  {name}: " + "; ".join(lines[:8]) + (f" (+{len(lines) - 8} more)" if len(lines) > 8 else ""))
            _baselines[key] = (value, now)  # report each change once
    result = yield
    if changed:
        pytest.fail(
            f"{item.nodeid} changed shared fixtures that later tests read:\n" + "\n".join(changed)
            + "\nwork on a copy (e.g. shutil.copytree into tmp_path) instead",
            pytrace=False,
        )
    return result
