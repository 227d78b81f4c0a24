"""Recognitions kept per module, reused while nothing a trace can read has changed.

Recognizing a user-written module (trace.recognize) traces its forward with torch.fx at every call: milliseconds
for a NeuS-sized model, a real share of a training step. The recipe it gives depends only on what the trace read:
the module tree, the attributes and code of its modules, the globals that code reads, and the call's shapes,
never on the values of parameters (those are read at each call). So a recognition is kept with a fingerprint of
all of that, recomputed at every call (tens of microseconds); any difference traces again. A module holding
something the fingerprint cannot compare (an object without a ``__dict__``, a large numpy array) is traced at
every call, as without the cache.

What is compared, and how:
- each module: its class (and the attributes and methods of every user-written class in its MRO), ``training``,
  the names, shapes, dtypes, devices and storage of its parameters and buffers, its submodules, and every other
  entry of its ``__dict__``;
- values: numbers, strings and the like by value; containers and plain objects by their contents; small tensors
  by value, larger ones by storage, shape and version (a trace bakes in only tensors of one element); the
  attribute the older weight_norm refreshes at each call by shape alone;
- functions (forwards, lambdas, helpers): their code, defaults, closure cells and the globals their code
  names, recursively; code shipped with Python or torch by identity alone.
"""
import functools
import os
import sys
import sysconfig
import types
import weakref
from typing import Callable, Optional

import torch
from torch import nn
from torch.nn.utils.weight_norm import WeightNorm

_MAX_DEPTH = 12          # nesting of containers and objects followed
_MAX_VALUES = 20000      # values compared per fingerprint; a larger model is traced at every call
_MAX_KEYS_PER_MODULE = 8  # distinct calls (has_cond, ndim, shapes) kept per module
_SMALL_TENSOR = 16       # tensors of at most this many elements are compared by value

# Attributes every nn.Module has from nn.Module.__init__: compared through parameters, buffers, submodules and
# `training`, or (hooks) checked by spec.call_time_reason before every recognition.
_MODULE_INTERNALS = frozenset(vars(nn.Module())) | {"_torchjac_x_second"}
_BY_VALUE = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size,
             torch.memory_format, torch.layout, type(Ellipsis), type(NotImplemented))
# Code shipped with torch or Python is not the user's: compared by identity, not followed into. Installed
# packages (site-packages, inside Python's directory) are followed: a published model may be one.
_TORCH_DIR = os.path.realpath(os.path.dirname(torch.__file__)) + os.sep
_STDLIB_DIRS = tuple({os.path.realpath(sysconfig.get_paths()[k]) + os.sep for k in ("stdlib", "platstdlib")})
_PACKAGE_DIRS = (os.sep + "site-packages" + os.sep, os.sep + "dist-packages" + os.sep)


class _Unguardable(Exception):
    """The fingerprint cannot compare some value the trace may have read."""


@functools.lru_cache(maxsize=4096)
def _is_library_file(filename: str) -> bool:
    if not filename or filename.startswith("<frozen"):
        return True
    path = os.path.realpath(filename)
    return path.startswith(_TORCH_DIR) or (path.startswith(_STDLIB_DIRS) and not any(d in path for d in _PACKAGE_DIRS))


def _is_library_class(cls: type) -> bool:
    module = sys.modules.get(cls.__module__)
    return module is None or cls.__module__ == "builtins" or _is_library_file(getattr(module, "__file__", "") or "")


@functools.lru_cache(maxsize=4096)
def _code_names(code: types.CodeType) -> tuple:
    """The global and attribute names code (and the code nested in it: comprehensions, inner functions) reads."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names.update(_code_names(const))
    return tuple(sorted(names))


class _Fingerprint:
    def __init__(self):
        self.seen = {}   # id -> index, for shared and cyclic references
        self.alive = []  # keeps what `seen` names alive, so its ids are not reused while fingerprinting

    def of(self, value, depth: int = 0):
        kind = type(value)
        if kind in _BY_VALUE:
            return kind, value
        if torch.is_tensor(value):
            return self.tensor(value)
        if id(value) in self.seen:
            return "seen", self.seen[id(value)]
        if depth > _MAX_DEPTH or len(self.seen) > _MAX_VALUES:
            raise _Unguardable(f"more than {_MAX_DEPTH} levels or {_MAX_VALUES} values")
        self.seen[id(value)] = len(self.seen)
        self.alive.append(value)
        depth += 1
        if isinstance(value, (bool, int, float, complex, str, bytes)):  # subclasses: IntEnum, numpy scalars
            return kind, value
        if kind in (tuple, list) or isinstance(value, tuple):  # tuple subclasses: NamedTuple
            return kind, tuple(self.of(v, depth) for v in value)
        if isinstance(value, dict):
            return kind, tuple((self.of(k, depth), self.of(v, depth)) for k, v in value.items())
        if isinstance(value, (set, frozenset)):
            return kind, tuple(sorted(repr(self.of(v, depth)) for v in value))
        if isinstance(value, slice):
            return kind, self.of((value.start, value.stop, value.step), depth)
        if isinstance(value, nn.Module):
            return self.module(value, depth)
        if isinstance(value, types.FunctionType):
            return self.function(value, depth)
        if isinstance(value, types.MethodType):
            return kind, self.of(value.__func__, depth), self.of(value.__self__, depth)
        if isinstance(value, functools.partial):
            return kind, self.of(value.func, depth), self.of(value.args, depth), self.of(value.keywords, depth)
        if isinstance(value, type):
            return self.cls(value, depth)
        if isinstance(value, (types.ModuleType, types.BuiltinFunctionType, types.BuiltinMethodType,
                              types.WrapperDescriptorType, types.MethodWrapperType, types.MethodDescriptorType,
                              types.GetSetDescriptorType, types.MemberDescriptorType, weakref.ref)):
            return kind, id(value)
        if callable(value) and (_is_library_class(kind) or not hasattr(value, "__dict__")):
            return kind, id(value)  # torch's ops (torch.ops.aten.add), numpy's ufuncs, operator.itemgetter
        if type(value).__module__ == "numpy" and hasattr(value, "tobytes"):
            if value.size > 1024:
                raise _Unguardable("a numpy array of more than 1024 elements")
            return kind, value.shape, str(value.dtype), value.tobytes()
        if hasattr(value, "__dict__") or hasattr(kind, "__slots__"):
            slots = [s for c in kind.__mro__ for s in getattr(c, "__slots__", ()) if hasattr(value, s)]
            return (self.cls(kind, depth), self.of(getattr(value, "__dict__", {}), depth),
                    tuple((s, self.of(getattr(value, s), depth)) for s in slots))
        raise _Unguardable(f"a {kind.__module__}.{kind.__qualname__}")

    def tensor(self, t: torch.Tensor, shape_only: bool = False):
        meta = (tuple(t.shape), t.dtype, t.device, t.requires_grad, type(t))
        if shape_only:
            return meta
        if t.numel() <= _SMALL_TENSOR and not t.is_meta and t.layout == torch.strided:
            return meta + (tuple(t.detach().reshape(-1).tolist()),)  # a trace may bake one element in
        return meta + (t.stride(), t.data_ptr(), t._version)

    def module(self, m: nn.Module, depth: int):
        refreshed = {hook.name for hook in m._forward_pre_hooks.values() if isinstance(hook, WeightNorm)}
        return (self.cls(type(m), depth), m.training,
                tuple((n, None if p is None else (self.tensor(p, shape_only=True), p.data_ptr()))
                      for n, p in m._parameters.items()),
                tuple((n, None if b is None else self.tensor(b)) for n, b in m._buffers.items()),
                tuple((n, None if s is None else self.of(s, depth)) for n, s in m._modules.items()),
                tuple((n, self.tensor(v, shape_only=True) if n in refreshed and torch.is_tensor(v)
                       else self.of(v, depth))
                      for n, v in vars(m).items() if n not in _MODULE_INTERNALS))

    def cls(self, cls: type, depth: int):
        # Library classes' own attributes are not followed, but a user class may be among their bases
        # (parametrize makes a class `Parametrized<Name>` from the module's).
        if id(cls) in self.seen:
            return "seen", self.seen[id(cls)]
        self.seen[id(cls)] = len(self.seen)
        self.alive.append(cls)
        return "class", id(cls), tuple(
            (c.__qualname__, tuple((n, self.of(v, depth + 1)) for n, v in vars(c).items()
                                   if n not in ("__dict__", "__weakref__", "__doc__", "__module__", "__qualname__")))
            for c in cls.__mro__ if not _is_library_class(c))

    def function(self, fn: types.FunctionType, depth: int):
        code = fn.__code__
        if _is_library_file(code.co_filename):
            return "function", id(fn)
        cells = tuple(self.of(c.cell_contents, depth) if _cell_filled(c) else "empty" for c in fn.__closure__ or ())
        globals_read = []
        for name in _code_names(code):
            if name in fn.__globals__:
                value = fn.__globals__[name]
                globals_read.append((name, self.of(value, depth)))
                if isinstance(value, types.ModuleType):  # what the code reads off it: `config.SCALE`, `np.pi`
                    attributes = vars(value)  # not getattr: a module's __getattr__ may warn or import
                    globals_read.append((name, tuple((n, self.of(attributes[n], depth))
                                                     for n in _code_names(code) if n in attributes)))
        return ("function", id(fn), id(code), self.of(fn.__defaults__, depth), self.of(fn.__kwdefaults__, depth),
                cells, tuple(globals_read))


def _cell_filled(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:
        return False
    return True


def fingerprint(module: nn.Module, key) -> Optional[tuple]:
    """Everything the recognition of module, called as key says, can depend on; None if it cannot be compared."""
    try:
        return (key, torch.get_default_dtype(), torch.is_grad_enabled(), _Fingerprint().of(module))
    except _Unguardable:
        return None


_kept: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def recognition(module: nn.Module, key: tuple, recognize: Callable):
    """recognize()'s result for module called as key says, reused while the module's fingerprint is the same."""
    seen = fingerprint(module, key)
    if seen is None:
        return recognize()
    kept = _kept.setdefault(module, {})
    entry = kept.get(key)
    if entry is not None and entry[0] == seen:
        return entry[1]
    result = recognize()
    if fingerprint(module, key) != seen:  # tracing the forward changed the module: its next call may differ
        kept.pop(key, None)
        return result
    if key not in kept and len(kept) >= _MAX_KEYS_PER_MODULE:
        kept.pop(next(iter(kept)))
    kept[key] = (seen, result)
    return result


def clear():
    _kept.clear()
