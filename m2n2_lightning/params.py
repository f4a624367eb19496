"""A module's parameters as one flat vector, and populations of such vectors.

M2N2 and CMA-ES see a network as one vector theta in R^D. `FlatParams` fixes the
order once: the module's parameters in `named_parameters()` order (registration
order), each flattened row-major (`Tensor.reshape(-1)`). A population is a
`[P, D]` tensor; `population_forward` runs `[k, D]` candidates on shared inputs
with `torch.func.functional_call` under `torch.func.vmap`, so any `nn.Module`
can be scored without building k module objects. A module may offer a faster
batched forward of its own, `forward_population(params, inputs)` (the MLP does,
built on `stacked_linear`); it is used where it is defined beside `forward`.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap


class NotVmappableError(ValueError):
    """The module cannot be evaluated for a batch of parameter vectors at once."""


@dataclass(frozen=True)
class ParamSpec:
    """Name, shape and position of one parameter inside the flat vector."""

    name: str
    shape: torch.Size
    offset: int
    numel: int


class FlatParams:
    """The fixed map between a module's parameters and a flat vector of length D."""

    def __init__(self, module: nn.Module) -> None:
        specs: list[ParamSpec] = []
        offset = 0
        for name, p in module.named_parameters():
            specs.append(ParamSpec(name, p.shape, offset, p.numel()))
            offset += p.numel()
        if offset == 0:
            raise ValueError(f"{type(module).__name__} has no parameters to evolve.")
        self.specs: tuple[ParamSpec, ...] = tuple(specs)
        self.num_params: int = offset
        self._shapes = [s.shape for s in specs]
        self._numels = [s.numel for s in specs]
        #: Modules whose names and shapes `load_into` has checked in full (then only shapes).
        self._checked: weakref.WeakSet[nn.Module] = weakref.WeakSet()

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.specs]

    def flatten(self, module: nn.Module) -> Tensor:
        """The module's current parameters as one detached vector [D]."""
        self.check_compatible(module)
        return flat_vector(module)

    def unflatten(self, vector: Tensor) -> dict[str, Tensor]:
        """Views of `vector` ([..., D]) shaped like each parameter ([..., *shape])."""
        if vector.shape[-1] != self.num_params:
            raise ValueError(
                f"expected vectors of length D = {self.num_params}, got shape {tuple(vector.shape)}"
            )
        lead = vector.shape[:-1]
        return {
            s.name: vector.narrow(-1, s.offset, s.numel).reshape(*lead, *s.shape)
            for s in self.specs
        }

    @torch.no_grad()
    def load_into(self, module: nn.Module, vector: Tensor) -> nn.Module:
        """Copy a flat vector [D] into the module's parameters in place (one fused copy)."""
        if vector.shape != (self.num_params,):
            raise ValueError(f"expected a vector of length D = {self.num_params}, got shape {tuple(vector.shape)}")
        params = list(module.parameters())
        if module not in self._checked or [p.shape for p in params] != self._shapes:
            self.check_compatible(module)
            self._checked.add(module)
        torch._foreach_copy_(params, [part.reshape(shape) for part, shape in zip(vector.split(self._numels), self._shapes)])
        return module

    def check_compatible(self, module: nn.Module) -> None:
        """Raise a ValueError naming the mismatch if `module` has other parameters."""
        theirs = [(n, p.shape) for n, p in module.named_parameters()]
        ours = [(s.name, s.shape) for s in self.specs]
        if theirs != ours:
            total = sum(p.numel() for p in module.parameters())
            diff = [f"{n}: {tuple(a)} vs {tuple(b)}" for (n, a), (_, b) in zip(ours, theirs) if a != b]
            names = {n for n, _ in ours} ^ {n for n, _ in theirs}
            detail = "; ".join(diff + [f"only in one: {sorted(names)}"] if names else diff)
            raise ValueError(
                f"module {type(module).__name__} has {total} parameters, expected {self.num_params} "
                f"in the template's layout ({detail or 'different order'})."
            )


def flat_vector(source: nn.Module | Tensor) -> Tensor:
    """A module's parameters (in `FlatParams` order) or any tensor as a detached [D] vector."""
    if isinstance(source, nn.Module):
        return torch.cat([p.detach().reshape(-1) for p in source.parameters()])
    return torch.as_tensor(source).detach().reshape(-1)


def _check_vmappable(module: nn.Module) -> None:
    for name, sub in module.named_modules():
        if isinstance(sub, nn.modules.batchnorm._BatchNorm) and sub.training and sub.track_running_stats:
            raise NotVmappableError(
                f"{name or type(module).__name__} ({type(sub).__name__}) updates its running "
                "statistics in training mode, which cannot be done for a batch of candidates. "
                "Call model.eval() before evolving it, or build it with track_running_stats=False."
            )


def fused_linear_applies(inputs: Tensor, weight: Tensor) -> bool:
    """Whether `fused_linear` can use oneDNN: CPU, float32 or bfloat16 alike, no autograd, eager.

    Under torch.compile (which lowers this op only for frozen weights) and under
    torch.func transforms such as vmap (it has no batching rule) the plain path is taken.
    """
    if inputs.device.type != "cpu" or inputs.dtype != weight.dtype or not torch.backends.mkldnn.is_available():
        return False
    if torch.compiler.is_compiling() or torch._C._functorch.is_functorch_wrapped_tensor(weight):
        return False
    if not torch.backends.mkldnn.enabled or (torch.is_grad_enabled() and (inputs.requires_grad or weight.requires_grad)):
        return False
    if inputs.dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return inputs.dtype == torch.float32


def fused_linear(inputs: Tensor, weight: Tensor, bias: Tensor | None = None, relu: bool = False) -> Tensor:
    """`inputs [N, in] @ weight [in, out] + bias [out]`, then ReLU if asked.

    Where `fused_linear_applies`, one oneDNN matmul with bias and ReLU fused:
    on the CPUs here 2-4x faster than torch.matmul (MKL) at the MLP's shapes
    (benchmarks/RESULTS.md); else addmm.
    """
    if fused_linear_applies(inputs, weight):
        return onednn_linear(inputs, weight, bias, relu)
    out = inputs @ weight if bias is None else torch.addmm(bias, inputs, weight)
    return out.relu_() if relu else out


def onednn_linear(inputs: Tensor, weight: Tensor, bias: Tensor | None = None, relu: bool = False) -> Tensor:
    """`fused_linear` through oneDNN without the checks (the caller made them)."""
    return torch.ops.mkldnn._linear_pointwise(inputs, weight.t(), bias, "relu" if relu else "none", [], "")


def _own_population_forward(module: nn.Module) -> Any:
    """`module.forward_population` when the class that defines `forward` defines it too, else None.

    A subclass that overrides `forward` alone, or a module with forward hooks,
    goes through `functional_call` so that what runs is what `forward` does.
    """
    owner = next(c for c in type(module).__mro__ if "forward" in vars(c))
    if "forward_population" not in vars(owner) or module._forward_hooks or module._forward_pre_hooks:
        return None
    return module.forward_population


def population_forward(module: nn.Module, flat: FlatParams, candidates: Tensor, inputs: Any) -> Any:
    """Run each of `candidates` [k, D] as `module`'s parameters on the same `inputs`.

    Returns the module's output with a leading candidate dimension, e.g. [k, N, C]
    logits for [N, ...] inputs. Buffers are shared by all candidates. Uses the
    module's own `forward_population(params, inputs)` (parameters stacked
    [k, *shape], by name) where it has one, else `functional_call` under `vmap`.
    """
    if candidates.dim() != 2 or candidates.shape[1] != flat.num_params:
        raise ValueError(
            f"candidates must have shape [k, {flat.num_params}], got {tuple(candidates.shape)}"
        )
    params = flat.unflatten(candidates)
    own = _own_population_forward(module)
    if own is not None:
        return own(params, inputs)
    _check_vmappable(module)

    def run_one(p: dict[str, Tensor]) -> Any:
        return functional_call(module, p, (inputs,))

    try:
        return vmap(run_one, in_dims=(0,), randomness="different")(params)
    except RuntimeError as err:
        if "vmap" in str(err) or "batched" in str(err).lower():
            raise NotVmappableError(
                f"{type(module).__name__} cannot run under torch.func.vmap: {err}. "
                "Modules that write to their own state during forward (in-place buffer updates, "
                ".item() calls, data-dependent Python control flow) must be rewritten or put in eval mode."
            ) from err
        raise
