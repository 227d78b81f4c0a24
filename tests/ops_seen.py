"""Records which ops run, to tell the fused path (torchjac ops) from the generic one."""
import contextlib

from torch.utils._python_dispatch import TorchDispatchMode


class _Recorder(TorchDispatchMode):
    def __init__(self, seen):
        super().__init__()
        self.seen = seen

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.add(func.name().split("::")[0] + "." + func.name().split("::")[-1])
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def ops_seen():
    seen = set()
    with _Recorder(seen):
        yield seen
