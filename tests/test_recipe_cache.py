"""The recognition of a user-written module is reused between calls, and traced again after any change a trace
could read: attributes, submodules, train/eval, code, globals, closures, constant tensors, configs.

Each test calls the model, changes it, and checks the next call against the torch.func oracle (a stale recipe
would give the old model's Jacobian) and that it traced again; unchanged calls must not trace.
"""
import dataclasses
import functools
import os
import sysconfig
import threading
import types

import pytest
import torch
from torch import nn

import torchjac
from torchjac import recipe_cache, spec
from conftest import assert_close64, oracle_jacobian

SCALE = 2.0                                 # a global the forward reads
CONFIG = types.ModuleType("model_config")   # a config module the forward reads an attribute of
CONFIG.SHIFT = 1.0


@pytest.fixture
def traces(monkeypatch):
    """The number of torch.fx recognitions since the test began."""
    count = [0]
    recognize = spec.recognize

    def counted(*args, **kwargs):
        count[0] += 1
        return recognize(*args, **kwargs)
    monkeypatch.setattr(spec, "recognize", counted)
    return count


class Field(nn.Module):
    """A small user-written field; the variants below each read one more thing in their forward."""

    def __init__(self, width=8):
        super().__init__()
        self.first = nn.Linear(3, width)
        self.hidden = nn.ModuleList(nn.Linear(width, width) for _ in range(3))
        self.last = nn.Linear(width, 3)
        self.act = nn.Softplus(beta=10.0)

    def trunk(self, h):
        return h

    def forward(self, x):
        h = self.act(self.first(x))
        return self.last(self.trunk(h))


def _traces_of_call(f, x, traces) -> int:
    """Recognitions made by one call of torchjac.jacobian, checked against the oracle."""
    before = traces[0]
    assert_close64(torchjac.jacobian(f, x), oracle_jacobian(f, x)[1])
    return traces[0] - before


def _points():
    torch.manual_seed(0)
    return torch.randn(40, 3, dtype=torch.float64)


def _changed_once(f, change, traces):
    """Recognized once; called again without a trace; changed, traced once more; called again without one."""
    x = _points()
    f = f.double()
    path, detail = torchjac.explain(f, x)
    assert path == "fused", detail
    _traces_of_call(f, x, traces)
    assert _traces_of_call(f, x, traces) == 0
    change(f)
    assert _traces_of_call(f, x, traces) == 1
    assert _traces_of_call(f, x, traces) == 0


class LayerCount(Field):
    def __init__(self):
        super().__init__()
        self.depth = 1

    def trunk(self, h):
        for layer in self.hidden[:self.depth]:
            h = self.act(layer(h))
        return h


class AttributeScale(Field):
    def __init__(self):
        super().__init__()
        self.scale = 2.0

    def forward(self, x):
        return self.last(self.act(self.first(x * self.scale)))


class ClassScale(Field):
    SCALE = 2.0

    def forward(self, x):
        return self.last(self.act(self.first(x * self.SCALE)))


class TrainingBranch(Field):
    def forward(self, x):
        h = self.act(self.first(x))
        return self.last(h * 0.5 if self.training else h)


class GlobalScale(Field):
    def forward(self, x):
        return self.last(self.act(self.first(x * SCALE)))


def _shift(h):  # a helper the forward calls, reading a config module's attribute
    return h * CONFIG.SHIFT


class HelperShift(Field):
    def forward(self, x):
        return self.last(_shift(self.act(self.first(x))))


class TensorScale(Field):
    def __init__(self):
        super().__init__()
        self.freq = torch.tensor(2.0, dtype=torch.float64)  # a constant the trace folds in as a number

    def forward(self, x):
        return self.last(self.act(self.first(x * self.freq)))


class ClosureScale(Field):
    def __init__(self):
        super().__init__()
        factor = [2.0]
        self.post = lambda h: h * factor[0]
        self.set_factor = lambda v: factor.__setitem__(0, v)

    def forward(self, x):
        return self.last(self.post(self.act(self.first(x))))


@dataclasses.dataclass
class Options:
    scale: float = 2.0
    skip: bool = False


class Configured(Field):
    def __init__(self):
        super().__init__()
        self.options = Options()

    def forward(self, x):
        h = self.act(self.first(x * self.options.scale))
        if self.options.skip:
            h = self.act(self.hidden[0](h)) + h
        return self.last(h)


class OutputSlice(Field):
    def __init__(self):
        super().__init__()
        self.last = nn.Linear(8, 4)

    def forward(self, x):
        return self.last(self.act(self.first(x)))[..., :3]


def _set_global_scale(f):
    global SCALE
    SCALE = 0.5


def _set_config_shift(f):
    CONFIG.SHIFT = 3.0


def _class_scale(f):
    type(f).SCALE = 0.25


def _wider_last(f):
    f.last = nn.Linear(8, 5).double()


def _half_forward(self, x):
    return self.last(self.act(self.first(x))) * 0.5


CHANGES = {
    "int attribute": (LayerCount, lambda f: setattr(f, "depth", 3)),
    "float attribute": (AttributeScale, lambda f: setattr(f, "scale", 0.5)),
    "class attribute": (ClassScale, _class_scale),
    "train to eval": (TrainingBranch, lambda f: f.eval()),
    "submodule attribute": (Field, lambda f: setattr(f.act, "beta", 2.0)),
    "replaced activation": (Field, lambda f: setattr(f, "act", nn.Tanh())),
    "global constant": (GlobalScale, _set_global_scale),
    "config module attribute": (HelperShift, _set_config_shift),
    "tensor constant in place": (TensorScale, lambda f: f.freq.fill_(3.0)),
    "tensor constant through .data": (TensorScale, lambda f: f.freq.data.fill_(3.0)),
    "tensor constant replaced": (TensorScale, lambda f: setattr(f, "freq", torch.tensor(4.0, dtype=torch.float64))),
    "closure variable": (ClosureScale, lambda f: f.set_factor(0.5)),
    "dataclass field": (Configured, lambda f: setattr(f.options, "scale", 0.5)),
    "dataclass flag": (Configured, lambda f: setattr(f.options, "skip", True)),
    "layer of another width": (OutputSlice, _wider_last),
}


@pytest.fixture
def restore_globals():
    global SCALE
    saved = SCALE, CONFIG.SHIFT, ClassScale.SCALE
    yield
    SCALE, CONFIG.SHIFT, ClassScale.SCALE = saved


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_a_change_is_traced_again(change, traces, restore_globals):
    model, mutate = CHANGES[change]
    torch.manual_seed(0)
    _changed_once(model(), mutate, traces)


def test_forward_patched_on_the_class(traces, monkeypatch):
    class Patched(Field):
        pass
    torch.manual_seed(0)
    _changed_once(Patched(), lambda f: monkeypatch.setattr(Patched, "forward", _half_forward), traces)


def test_a_forward_set_on_the_instance_is_called_by_the_generic_path():
    """torch.fx traces the class's forward; the instance's is the one the model runs."""
    torch.manual_seed(0)
    f, x = Field().double(), _points()
    torchjac.jacobian(f, x)
    f.forward = types.MethodType(_half_forward, f)
    assert torchjac.explain(f, x)[0] == "generic"
    assert_close64(torchjac.jacobian(f, x), oracle_jacobian(f, x)[1])
    f.act.forward = torch.tanh  # on a layer the fused path reads by its type
    del f.forward
    assert torchjac.explain(f, x)[0] == "generic"
    assert_close64(torchjac.jacobian(f, x), oracle_jacobian(f, x)[1])


def test_weights_changed_in_place_reuse_the_recognition(traces):
    """An optimizer step changes parameters in place: values are read at every call, the recipe is kept."""
    torch.manual_seed(0)
    f, x = Field().double(), _points()
    opt = torch.optim.SGD(f.parameters(), lr=0.1)
    traces[0] = 0
    for step in range(3):
        xr = x.clone().requires_grad_(True)
        jac = torchjac.jacobian(f, xr)
        assert_close64(jac, oracle_jacobian(f, x)[1])
        opt.zero_grad()
        jac.square().sum().backward()
        opt.step()
    assert traces[0] == 1


def test_cast_to_another_dtype_is_traced_again(traces):
    torch.manual_seed(0)
    f, x = Field(), _points()
    traces[0] = 0
    assert_close64(torchjac.jacobian(f.double(), x), oracle_jacobian(f, x)[1])
    f.float()
    jac = torchjac.jacobian(f, x.float())
    torch.testing.assert_close(jac, oracle_jacobian(f, x.float())[1])
    assert traces[0] == 2


def test_another_number_of_points_reuses_a_recognition_that_serves_any(traces):
    torch.manual_seed(0)
    f = Field().double()
    traces[0] = 0
    for n in (10, 20, 10):
        x = torch.randn(n, 3, dtype=torch.float64)
        assert_close64(torchjac.jacobian(f, x), oracle_jacobian(f, x)[1])
    assert traces[0] <= 2  # one per call's shapes at most


class Unguardable(Field):
    def __init__(self):
        super().__init__()
        self.lock = threading.Lock()  # no __dict__, not a kind the fingerprint knows


def test_a_module_that_cannot_be_fingerprinted_is_traced_at_every_call(traces):
    torch.manual_seed(0)
    f, x = Unguardable().double(), _points()
    for _ in range(3):
        assert _traces_of_call(f, x, traces) == 1


def test_code_of_installed_packages_is_followed():
    """A published model installed with pip lives in site-packages, inside Python's own directory; its globals
    and class attributes are compared like the user's, only torch's and Python's own code is not followed."""
    site_packages = sysconfig.get_paths()["purelib"]
    assert not recipe_cache._is_library_file(os.path.join(site_packages, "neus", "fields.py"))
    assert recipe_cache._is_library_file(torch.nn.functional.__file__)
    assert recipe_cache._is_library_file(functools.__file__)
