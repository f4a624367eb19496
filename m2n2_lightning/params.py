"""A module's parameters as one flat vector, and populations of such vectors.

M2N2 and CMA-ES see a network as one vector theta in R^D. `FlatParams` fixes the
order once: the module's parameters in `named_parameters()` order (registration
order), each flattened row-major (`Tensor.reshape(-1)`). A population is a
`[P, D]` tensor; `population_forward` runs `[k, D]` candidates on shared inputs
with `torch.func.functional_call` under `torch.func.vmap`, so any `nn.Module`
can be scored without building k module objects. A module may offer a faster
batched forward of its own, `forward_population(params, inputs)` (public
extension hook; the MLP has one, built on `m2n2_lightning.kernels`); it is
used where it is defined beside `forward`.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
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


def evolved_parameters(module: nn.Module, include_frozen: bool = True) -> list[tuple[str, nn.Parameter]]:
    """The (name, parameter) pairs that make up the flat vector, in `named_parameters()` order;
    without `include_frozen`, those with `requires_grad=False` stay out (and fixed)."""
    return [(n, p) for n, p in module.named_parameters() if include_frozen or p.requires_grad]


class FlatParams:
    """The fixed map between a module's parameters and a flat vector of length D.

    `include_frozen=False` leaves parameters with `requires_grad=False` out of
    the vector: they keep the module's values in every candidate.
    """

    def __init__(self, module: nn.Module, include_frozen: bool = True) -> None:
        self.include_frozen = include_frozen
        specs: list[ParamSpec] = []
        offset = 0
        for name, p in evolved_parameters(module, include_frozen):
            specs.append(ParamSpec(name, p.shape, offset, p.numel()))
            offset += p.numel()
        if offset == 0:
            raise ValueError(
                f"{type(module).__name__} has no parameters to evolve"
                + ("" if include_frozen else " (all have requires_grad=False; evolve_frozen=True includes them)")
            )
        self.specs: tuple[ParamSpec, ...] = tuple(specs)
        self.num_params: int = offset
        self._shapes = [s.shape for s in specs]
        self._numels = [s.numel for s in specs]
        #: The parameters of each module `load_into` has checked in full, in vector order (then only shapes).
        self._params: weakref.WeakKeyDictionary[nn.Module, tuple[list[nn.Parameter], list[nn.Parameter]]] = (
            weakref.WeakKeyDictionary()
        )

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.specs]

    @property
    def layout(self) -> list[tuple[str, int]]:
        """(name, numel) of each parameter in vector order (what `chromosomes` patterns are matched against)."""
        return [(s.name, s.numel) for s in self.specs]

    def flatten(self, module: nn.Module) -> Tensor:
        """The module's current values of the vector's parameters as one detached vector [D]."""
        return torch.cat([p.detach().reshape(-1) for p in self.parameters_of(module)])

    def parameters_of(self, module: nn.Module) -> list[nn.Parameter]:
        """`module`'s parameters named in the vector, in its order (checked in full once per module and
        again whenever one of its parameters was replaced)."""
        everything = list(module.parameters())
        cached = self._params.get(module)
        if cached is None or len(cached[0]) != len(everything) or any(a is not b for a, b in zip(cached[0], everything)):
            self.check_compatible(module)  # new module, or a parameter replaced since: check names and shapes again
            named = dict(module.named_parameters())
            cached = self._params[module] = (everything, [named[name] for name in self.names])
        return cached[1]

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
        params = self.parameters_of(module)
        torch._foreach_copy_(params, [part.reshape(shape) for part, shape in zip(vector.split(self._numels), self._shapes)])
        return module

    @torch.no_grad()
    def write_into(self, module: nn.Module, write: Callable[[int, int, Tensor], Any]) -> nn.Module:
        """Fill the module's parameters in place, tensor by tensor: `write(start, stop, out)` puts coordinates
        [start, stop) of a flat vector into `out`, the parameter's own storage viewed flat (no [D] copy)."""
        for spec, param in zip(self.specs, self.parameters_of(module)):
            target = param if param.is_contiguous() else torch.empty(param.shape, dtype=param.dtype, device=param.device)
            write(spec.offset, spec.offset + spec.numel, target.view(-1))
            if target is not param:
                param.copy_(target)
        return module

    def check_compatible(self, module: nn.Module) -> None:
        """Raise a ValueError naming the mismatch if `module` has other parameters."""
        named = dict(module.named_parameters())
        theirs = [(n, p.shape) for n, p in module.named_parameters() if n in set(self.names) or self.include_frozen]
        ours = [(s.name, s.shape) for s in self.specs]
        if theirs != ours:
            total = sum(p.numel() for _, p in named.items())
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
        return FlatParams(source).flatten(source)
    return torch.as_tensor(source).detach().reshape(-1)


def _check_vmappable(module: nn.Module) -> None:
    for name, sub in module.named_modules():
        if isinstance(sub, nn.modules.batchnorm._BatchNorm) and sub.training and sub.track_running_stats:
            raise NotVmappableError(
                f"{name or type(module).__name__} ({type(sub).__name__}) updates its running "
                "statistics in training mode, which cannot be done for a batch of candidates. "
                "Call model.eval() before evolving it, or build it with track_running_stats=False."
            )


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
    # The module's own batched forward, when the class that defines `forward` defines it too
    # (a subclass overriding `forward` alone, or forward hooks, go through `functional_call`
    # so that what runs is what `forward` does).
    owner = next(c for c in type(module).__mro__ if "forward" in vars(c))
    if "forward_population" in vars(owner) and not (module._forward_hooks or module._forward_pre_hooks):
        for name, p in module.named_parameters():  # frozen parameters left out of the vector: shared by all
            if name not in params:
                params[name] = p.detach().expand(len(candidates), *p.shape)
        return module.forward_population(params, inputs)
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
