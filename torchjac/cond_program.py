"""The cond program: what a model's forward computes from cond alone, recorded by the recognizer
(torchjac/trace.py) and replayed at each call on the call's cond (torchjac/spec.py).

FiLM's gamma(z) and beta(z), FFJORD's sigmoid gates of t, a hypernetwork's weights and the numbers that mix
Linear layers of one input are such values. Replayed on one cond shared by all points, they are tensors that
fold into the layers' weights; autograd carries the gradients back into the modules that computed them.

A program is a tuple of steps ``(kind, target, args, kwargs)``, plain values only (a recipe must be a constant
to torch.compile): kind "cond" (target: a scale), "parameter" (target: its qualified name; args: its view),
"module" (a submodule's qualified name), "function" (a name in COND_FUNCTIONS) or "method" (a name in
COND_METHODS). Arguments refer to earlier values by ValueRef.
"""
import operator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class ValueRef(NamedTuple):
    index: int  # an earlier value of the program


class SliceArg(NamedTuple):
    start: object
    stop: object
    step: object


# The functions a cond program may call, by name.
COND_FUNCTIONS = {"sigmoid": torch.sigmoid, "tanh": torch.tanh, "relu": torch.relu, "exp": torch.exp,
                  "sin": torch.sin, "cos": torch.cos, "softplus": F.softplus, "silu": F.silu, "elu": F.elu,
                  "gelu": F.gelu, "leaky_relu": F.leaky_relu, "add": operator.add, "sub": operator.sub,
                  "mul": operator.mul, "truediv": operator.truediv, "neg": operator.neg,
                  "getitem": operator.getitem, "cat": torch.cat, "linear": F.linear, "matmul": torch.matmul,
                  "chunk": torch.chunk, "split": torch.split}
# The name of each callable a traced forward may use for them.
FUNCTION_NAMES = {fn: name for name, fn in COND_FUNCTIONS.items()}
FUNCTION_NAMES.update({F.sigmoid: "sigmoid", F.tanh: "tanh", F.relu: "relu", torch.mul: "mul", torch.add: "add",
                       torch.sub: "sub", torch.div: "truediv", torch.concat: "cat", operator.matmul: "matmul",
                       torch.mm: "matmul"})
# The methods a cond program may call.
COND_METHODS = {"view", "reshape", "flatten", "squeeze", "unsqueeze", "expand", "t", "transpose", "permute",
                "contiguous", "sigmoid", "tanh", "exp", "relu", "__getitem__", "add", "sub", "mul", "div", "chunk",
                "split", "sum", "mean"}


def replay(f: nn.Module, program, cond: torch.Tensor, parameter) -> list:
    """The values of program for this call's cond, as the user passed it; ``parameter(f, name)`` reads a
    parameter as f's forward would (torchjac/spec.py's, which knows the older weight_norm)."""
    values = []

    def arg(a):
        if isinstance(a, ValueRef):
            return values[a.index]
        if isinstance(a, SliceArg):
            return slice(a.start, a.stop, a.step)
        if isinstance(a, tuple):
            return tuple(arg(b) for b in a)
        return a

    for kind, target, args, kwargs in program:
        args, kwargs = arg(args), {k: arg(v) for k, v in kwargs}
        if kind == "cond":
            values.append(cond * target if target != 1.0 else cond)
        elif kind == "parameter":
            p = parameter(f, target)
            values.append({"same": p, "t": p.t(), "row": p.unsqueeze(-2)}[args[0]])
        elif kind == "module":
            values.append(f.get_submodule(target)(*args, **kwargs))
        elif kind == "function":
            values.append(COND_FUNCTIONS[target](*args, **kwargs))
        else:
            values.append(getattr(args[0], target)(*args[1:], **kwargs))
    return values
