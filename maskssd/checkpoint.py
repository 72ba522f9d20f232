"""Checkpoints: written atomically (a killed process never leaves a half-written file), read without running
code, and loadable into a ready-to-use detector.

A training checkpoint holds model, optimiser, scheduler, epoch, RNG states, the resolved config and what
rebuilds the model (``build_args``); a deployment checkpoint needs only the model part. Everything in them is
tensors and plain containers, so they load with ``torch.load(weights_only=True)``.

Model files are what researchers pass around, and a pickle can call any function while it loads. Every model
file is therefore read by :func:`safe_load`: torch's weights-only unpickler (tensors, plain containers),
plus inert stand-ins for the classes of the public SSD300 tutorial's whole-module checkpoints (the
reference paper's starting point); any other global is refused before anything in the file runs.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import signal
import tempfile
import threading
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FunctionType, SimpleNamespace
from typing import Any

import numpy as np
import torch

from maskssd.errors import MaskSSDError, UnsafeCheckpointError

FORMAT_VERSION = 1


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM during the block and deliver them right after it.

    An interrupt inside ``torch.save`` leaves its zip writer half-way; its clean-up then raises a
    RuntimeError that hides the KeyboardInterrupt, and the run would end as failed instead of interrupted.
    Elsewhere than in the main thread (where Python runs signal handlers) this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    previous = {s: h for s, h in previous.items() if h is not None}  # None: installed outside Python, left alone
    for s in previous:
        signal.signal(s, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in dict.fromkeys(held):  # delivered now, to the handlers in force again
            signal.raise_signal(s)


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``. Ctrl-C or
    SIGTERM during the write take effect once it is complete (:func:`interrupts_deferred`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with interrupts_deferred():
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(obj, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return path


def rng_state() -> dict[str, Any]:
    """The torch, numpy, Python (and CUDA) RNG states as tensors and plain numbers, so that checkpoints
    load with ``weights_only=True`` (numpy's state holds an ndarray, which that unpickler refuses)."""
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached_gaussian)},
        "python": {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": None if gauss_next is None else float(gauss_next)},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["state"].tolist()), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------- safe loading
#: The public SSD300 tutorial's model classes (its ``model.py``): whole-module checkpoints reference them.
TUTORIAL_CLASSES = tuple(f"model.{n}" for n in ("SSD300", "VGGBase", "AuxiliaryConvolutions", "PredictionConvolutions"))


class InertModule:
    """Stands in for a pickled ``nn.Module`` (a tutorial class or one of torch's layers): keeps the pickled
    attributes as data and has no behaviour; no constructor or method of the real class ever runs."""

    pickled_as = "torch.nn.Module"
    dump_patches = False  # read by torch.load's check of the source saved with legacy module pickles

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # called only by a pickle REDUCE: arguments ignored
        self.__dict__["attributes"] = {}

    def __setstate__(self, state: Any) -> None:
        self.__dict__["attributes"] = state if isinstance(state, dict) else {}

    def state_dict(self, prefix: str = "") -> OrderedDict[str, torch.Tensor]:
        """What ``nn.Module.state_dict`` of the real module gives: parameters, persistent buffers, children."""
        a = self.__dict__.get("attributes", {})
        out: OrderedDict[str, torch.Tensor] = OrderedDict()
        skip = a.get("_non_persistent_buffers_set") or set()
        for name, t in (a.get("_parameters") or {}).items():
            if isinstance(t, torch.Tensor):
                out[prefix + name] = t.detach()
        for name, t in (a.get("_buffers") or {}).items():
            if isinstance(t, torch.Tensor) and name not in skip:
                out[prefix + name] = t.detach()
        for name, child in (a.get("_modules") or {}).items():
            if isinstance(child, InertModule):
                out.update(child.state_dict(f"{prefix}{name}."))
        return out


class InertOptimizer(InertModule):
    """Stands in for a pickled ``torch.optim`` optimiser; dropped (None) from what :func:`safe_load` returns."""

    pickled_as = "torch.optim.Optimizer"


def _nothing(*args: Any, **kwargs: Any) -> None:
    """PyTorch 0.4 pickles call ``torch.nn.backends.thnn._get_thnn_function_backend()``: a no-op."""
    return None


def _plain_dict(*args: Any) -> dict:
    """``collections.defaultdict(factory)`` (an old optimiser's ``state``) as a plain dict: no factory kept."""
    return {}


_stand_ins: list[tuple[Any, str]] = []
_stand_ins_lock = threading.Lock()  # torch keeps its allow-list in one process-wide set


def _stand_in_globals() -> list[tuple[Any, str]]:
    """``(replacement, "module.name")`` pairs for torch's ``safe_globals``: the tutorial's classes and torch's
    layers and optimisers as inert stand-ins, and the few plain helpers their pickles call."""
    if _stand_ins:
        return _stand_ins

    def inert(base: type, name: str) -> tuple[type, str]:
        return type(name.rsplit(".", 1)[-1], (base,), {"pickled_as": name, "__module__": __name__}), name

    pairs = [inert(InertModule, n) for n in TUTORIAL_CLASSES]
    seen = set(TUTORIAL_CLASSES)
    for obj in [*vars(torch.nn).values(), *vars(torch.nn.modules).values(), *vars(torch.optim).values()]:
        if not isinstance(obj, type):
            continue
        name = f"{obj.__module__}.{obj.__qualname__}"
        if name in seen:
            continue
        if issubclass(obj, torch.nn.Module) and obj.__module__.startswith("torch.nn.modules."):
            pairs.append(inert(InertModule, name))
        elif issubclass(obj, torch.optim.Optimizer) and obj is not torch.optim.Optimizer:
            pairs.append(inert(InertOptimizer, name))
        else:
            continue
        seen.add(name)
    pairs += [(_plain_dict, "collections.defaultdict"), (dict, "builtins.dict"),
              (_nothing, "torch.nn.backends.thnn._get_thnn_function_backend")]
    _stand_ins.extend(pairs)
    return _stand_ins


def _plain(obj: Any) -> Any:
    """Stand-in modules as their state dicts, stand-in optimisers as None, through dicts, lists and tuples."""
    if isinstance(obj, InertOptimizer):
        return None
    if isinstance(obj, InertModule):
        return obj.state_dict()
    if isinstance(obj, dict):
        return type(obj)((k, _plain(v)) for k, v in obj.items()) if type(obj) in (dict, OrderedDict) else obj
    if isinstance(obj, list | tuple) and type(obj) in (list, tuple):
        return type(obj)(_plain(v) for v in obj)
    return obj


def _forbidden_globals(path: Path, error: Exception) -> list[str]:
    """The globals that made the weights-only unpickler refuse ``path``: a static scan of the pickle (zip
    checkpoints; runs nothing), else the one the error names."""
    try:
        found = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # a legacy (pre-1.6) file, or a pickle the scanner does not parse
        found = []
    return found or re.findall(r"GLOBAL (\S+)", str(error))[:1]


def _legacy_allowed() -> dict[str, Any]:
    """What the restricted unpickler of legacy files resolves: what rebuilding tensors needs (torch's
    ``*Storage`` types are resolved by ``torch.load`` itself), and the stand-ins."""
    from torch import _utils

    allowed: dict[str, Any] = {
        "collections.OrderedDict": OrderedDict,
        "builtins.set": set,
        "torch._utils._rebuild_tensor": _utils._rebuild_tensor,
        "torch._utils._rebuild_tensor_v2": _utils._rebuild_tensor_v2,
        "torch._utils._rebuild_parameter": _utils._rebuild_parameter,
        "torch._utils._rebuild_parameter_with_state": _utils._rebuild_parameter_with_state,
        "torch.nn.parameter.Parameter": torch.nn.Parameter,
        "torch.Size": torch.Size,
        "torch.device": torch.device,
    }
    allowed.update((name, obj) for obj, name in _stand_in_globals())
    return allowed


class _Refused(pickle.UnpicklingError):
    """A global outside the allow-list of :class:`_RestrictedUnpickler`."""

    def __init__(self, name: str):
        self.name = name
        super().__init__(f"Unsupported global: GLOBAL {name}")


def _fresh(f: Callable[..., Any]) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        return f(*args, **kwargs)

    return call


class _RestrictedUnpickler(pickle.Unpickler):
    """A pickle reader that resolves only :func:`_legacy_allowed` globals: any other is refused unloaded.

    Functions are handed out as wrappers made for this one load: a pickle BUILD may set attributes of what
    it resolved (``__defaults__``...), and must not reach the real functions that later loads use."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.allowed = {k: _fresh(v) if isinstance(v, FunctionType) else v for k, v in _legacy_allowed().items()}

    def find_class(self, module: str, name: str) -> Any:
        import _compat_pickle

        if (module, name) in _compat_pickle.NAME_MAPPING:  # Python 2 names, as pickle's own find_class maps them
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        found = self.allowed.get(f"{module}.{name}")
        if found is None:
            raise _Refused(f"{module}.{name}")
        return found


#: The ``pickle_module`` for ``torch.load`` of legacy files: :class:`_RestrictedUnpickler` for every pickle.
_restricted_pickle = SimpleNamespace(__name__="maskssd.checkpoint.restricted_pickle", Unpickler=_RestrictedUnpickler,
                                     load=lambda f, **kw: _RestrictedUnpickler(f, **kw).load())


def safe_load(path: str | Path) -> Any:
    """``torch.load(path, weights_only=True)`` that also reads whole-module pickles of the SSD300 tutorial
    (``{'epoch', 'model': <SSD300>, 'optimizer': <SGD>}``): their modules come back as state dicts, their
    optimisers as None. Raises :class:`UnsafeCheckpointError` (naming the file and the globals) for a file
    that needs any other Python object; nothing in such a file runs.

    Pre-1.6 (non-zip) files that pickle whole modules, as the tutorial's own checkpoint (PyTorch 0.4), record
    each module class as a persistent id that the weights-only unpickler refuses; those are read by
    :class:`_RestrictedUnpickler`, which resolves nothing but what rebuilding tensors needs and the stand-ins.
    """
    path = Path(path)
    with _stand_ins_lock, torch.serialization.safe_globals(_stand_in_globals()):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            if zipfile.is_zipfile(path):
                detail = str(e).split("WeightsUnpickler error:")[-1].strip().splitlines()[0][:200]
                raise UnsafeCheckpointError(path, _forbidden_globals(path, e), detail) from None
            obj = _load_legacy_restricted(path)
    return _plain(obj)


def _load_legacy_restricted(path: Path) -> Any:
    """A legacy-format file through :class:`_RestrictedUnpickler` (the only ``torch.load`` that is not
    ``weights_only``: its ``pickle_module`` resolves an allow-list only)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "source code of class ... has changed": the stand-ins have none
        try:
            return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_restricted_pickle)
        except _Refused as e:
            raise UnsafeCheckpointError(path, [e.name]) from None


def load(path: str | Path) -> dict[str, Any]:
    """Read a maskssd checkpoint (refuses files that are not one, with the reason), or a checkpoint of the
    reference paper's code (a tutorial-layout SSD300, see :func:`maskssd.models.import_reference_checkpoint`)
    as one. Reads with :func:`safe_load`: a file that needs arbitrary Python objects is refused unread."""
    path = Path(path)
    if not path.is_file():
        raise MaskSSDError(f"checkpoint not found: {path}")
    try:
        ckpt = safe_load(path)
    except MaskSSDError:
        raise
    except Exception as e:  # truncated, not a torch file, ...
        raise MaskSSDError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    if isinstance(ckpt, dict) and "model" in ckpt and "build_args" in ckpt:
        return ckpt
    from maskssd.models import import_reference_checkpoint

    imported = import_reference_checkpoint(ckpt, path)
    if imported is None:
        raise MaskSSDError(f"{path}: not a maskssd checkpoint (no model/build_args) nor an SSD300 of the reference "
                           "paper's code (tutorial layout)")
    from rich.console import Console

    Console(stderr=True).print(f"note: {imported['import_note']}", highlight=False, soft_wrap=True, markup=False)
    return imported


def load_detector(source: str | Path | dict[str, Any], device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """A detector in eval mode from a checkpoint file (or its loaded dict), and the checkpoint."""
    from maskssd.models import build_model

    ckpt = source if isinstance(source, dict) else load(source)
    args = dict(ckpt["build_args"])
    args["pretrained"] = False  # the weights come from the checkpoint
    args.pop("init_checkpoint", None)
    name = args.pop("name")
    model = build_model(name, **args)
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt
