"""A second device for CPU-only tests: tensors that say they are on `meta` but hold CPU data.

Why: the bug class under test is "a function mixes the tensor it was given (on the GPU) with a
tensor it made itself (on the CPU)". Real `meta` tensors catch it (torch refuses to mix meta and
CPU operands), but only for functions whose work does not depend on values: `int(t)`, `.tolist()`,
`topk(k)` with k from a tensor, boolean indexing need data, which meta tensors do not have.

`on_device(t)` wraps a CPU tensor as an `Accel` tensor (`.device` is meta) and, inside the
`fake_device()` context, every aten op is checked the way CUDA checks it:
  - an op that mixes Accel operands with CPU operands of one or more dimensions raises (CUDA
    raises "Expected all tensors to be on the same device"; 0-dim CPU tensors are allowed, as on
    CUDA, where they act as scalars);
  - a random op that writes Accel output with a CPU generator raises (CUDA: "Expected a 'cuda'
    device type for generator");
  - factories called with `device=<an Accel tensor's device>` make Accel tensors; `.to(...)`
    moves between the two (moving to the CPU is explicit, so it is allowed, as on CUDA);
  - everything else runs on the CPU data and wraps the results again, so values are real and
    tests can compare them with a plain CPU run.
Stricter than CUDA in one respect (CPU index tensors into device tensors are refused here): a
function that passes is device-safe on CUDA; one that fails may in rare cases have worked there.
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

DEVICE = torch.device("meta")  # what an Accel tensor reports


class Accel(torch.Tensor):
    """CPU data behind a tensor whose `.device` is `DEVICE` (only meaningful in fake_device())."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor):
        out = torch.Tensor._make_wrapper_subclass(
            cls, elem.shape, strides=elem.stride(), storage_offset=elem.storage_offset(),
            dtype=elem.dtype, device=DEVICE, requires_grad=False)
        out.elem = elem
        return out

    def __repr__(self) -> str:
        return f"Accel({self.elem!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(f"{func} on an Accel tensor outside fake_device()")


def on_device(t: torch.Tensor) -> Accel:
    return Accel(t)


def is_on_device(x) -> bool:
    return isinstance(x, Accel)


def _is_device(device) -> bool:
    return device is not None and torch.device(device) == DEVICE


_COPIES = {torch.ops.aten._to_copy.default, torch.ops.aten.to.dtype_layout,
           torch.ops.aten.to.device, torch.ops.aten.to.dtype}


class _Mode(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        leaves = pytree.arg_tree_leaves(*args, **kwargs)
        accel = [x for x in leaves if isinstance(x, Accel)]
        cpu = [x for x in leaves if isinstance(x, torch.Tensor) and not isinstance(x, Accel)
               and x.device.type == "cpu" and x.dim() > 0]
        target = kwargs.get("device")
        if func in _COPIES and target is not None:
            src = args[0]
            data = src.elem if isinstance(src, Accel) else src
            kwargs["device"] = torch.device("cpu")
            out = func(data, *args[1:], **kwargs)
            if out is data:  # to() may return its input: keep the copy semantics simple
                out = data.clone()
            return Accel(out) if _is_device(target) else out
        if accel and cpu:
            raise RuntimeError(f"{func}: expected all tensors to be on the same device, found "
                               f"{len(accel)} on the device and {len(cpu)} on cpu")
        on_dev = bool(accel) or _is_device(target)
        gen = kwargs.get("generator")
        if on_dev and gen is not None and gen.device.type == "cpu":
            raise RuntimeError(f"{func}: expected a device generator for device tensors, "
                               f"found a cpu generator")
        if _is_device(target):
            kwargs["device"] = torch.device("cpu")
        by_elem = {id(x.elem): x for x in accel}

        def unwrap(x):
            return x.elem if isinstance(x, Accel) else x

        out = func(*pytree.tree_map(unwrap, args), **pytree.tree_map(unwrap, kwargs))
        if not on_dev:
            return out

        def wrap(x):
            if isinstance(x, torch.Tensor):
                same = by_elem.get(id(x))  # in-place ops return their input
                return Accel(x) if same is None else same
            return x

        return pytree.tree_map(wrap, out)


@contextlib.contextmanager
def fake_device():
    with _Mode():
        yield


def to_cpu(x):
    """Accel tensors (also nested in tuples, lists, dataclass-free containers) back to CPU."""
    return pytree.tree_map(lambda t: t.elem.clone() if isinstance(t, Accel) else t, x)
