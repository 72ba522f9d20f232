"""Reading model files without running code.

Model files are what researchers pass around, and a pickle can call any function while it loads. Every model
file is therefore read by :func:`safe_load`: torch's weights-only unpickler (tensors, plain containers), plus
inert stand-ins for the classes of the public SSD300 tutorial's whole-module checkpoints (the reference
paper's starting point); any other global is refused before anything in the file runs.
"""

from __future__ import annotations

import pickle
import re
import threading
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from types import FunctionType, SimpleNamespace
from typing import Any

import torch

from maskssd.errors import UnsafeCheckpointError

__all__ = ["TUTORIAL_CLASSES", "InertModule", "InertOptimizer", "safe_load"]

#: The public SSD300 tutorial's model classes (its ``model.py``): whole-module checkpoints reference them.
TUTORIAL_CLASSES = tuple(
    f"model.{n}" for n in ("SSD300", "VGGBase", "AuxiliaryConvolutions", "PredictionConvolutions")
)


class InertModule:
    """Stands in for a pickled ``nn.Module`` (a tutorial class or one of torch's layers): keeps the pickled
    attributes as data and has no behaviour; no constructor or method of the real class ever runs."""

    pickled_as = "torch.nn.Module"
    dump_patches = False  # read by torch.load's check of the source saved with legacy module pickles

    def __init__(
        self, *args: Any, **kwargs: Any
    ) -> None:  # called only by a pickle REDUCE: arguments ignored
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
    pairs += [
        (_plain_dict, "collections.defaultdict"),
        (dict, "builtins.dict"),
        (_nothing, "torch.nn.backends.thnn._get_thnn_function_backend"),
    ]
    _stand_ins.extend(pairs)
    return _stand_ins


def _numpy_globals() -> list[tuple[Any, str]]:
    """Plain numeric numpy arrays (as in checkpoints of maskssd before 0.x stored numpy's RNG state): the array
    rebuild and numeric dtypes only; object, structured and string dtypes stay refused, so nothing but numbers
    can come back through them."""
    import numpy as np

    reconstruct = (
        np._core.multiarray._reconstruct if hasattr(np, "_core") else np.core.multiarray._reconstruct
    )
    pairs: list[tuple[Any, str]] = [
        (reconstruct, "numpy._core.multiarray._reconstruct"),
        (reconstruct, "numpy.core.multiarray._reconstruct"),  # pickled by numpy 1.x
        (np.ndarray, "numpy.ndarray"),
        (np.dtype, "numpy.dtype"),
    ]
    numeric = (np.bool_, np.number)
    for name in dir(getattr(np, "dtypes", None)):
        cls = getattr(np.dtypes, name)
        if (
            name.endswith("DType")
            and isinstance(cls, type)
            and issubclass(getattr(cls, "type", object), numeric)
        ):
            pairs.append((cls, f"numpy.dtypes.{name}"))
    return pairs


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
        self.allowed = {
            k: _fresh(v) if isinstance(v, FunctionType) else v for k, v in _legacy_allowed().items()
        }

    def find_class(self, module: str, name: str) -> Any:
        import _compat_pickle

        if (
            module,
            name,
        ) in _compat_pickle.NAME_MAPPING:  # Python 2 names, as pickle's own find_class maps them
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        found = self.allowed.get(f"{module}.{name}")
        if found is None:
            raise _Refused(f"{module}.{name}")
        return found


#: The ``pickle_module`` for ``torch.load`` of legacy files: :class:`_RestrictedUnpickler` for every pickle.
_restricted_pickle = SimpleNamespace(
    __name__="maskssd.checkpoint.restricted_pickle",
    Unpickler=_RestrictedUnpickler,
    load=lambda f, **kw: _RestrictedUnpickler(f, **kw).load(),
)


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
    with _stand_ins_lock, torch.serialization.safe_globals([*_stand_in_globals(), *_numpy_globals()]):
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
