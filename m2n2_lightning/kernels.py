"""Fast CPU kernels for batched scoring: oneDNN's fused linear layer.

On the x86 CPUs here oneDNN's matmul with bias and ReLU fused beats
`torch.matmul` (MKL) at the MLP's shapes (benchmarks/RESULTS.md), in float32
and, where the CPU has AVX512-BF16, in bfloat16. It is a private torch op
(`torch.ops.mkldnn._linear_pointwise`), so it lives here, behind one check.
"""

from __future__ import annotations

import torch
from torch import Tensor


def onednn_applies(inputs: Tensor, weight: Tensor) -> bool:
    """Whether `onednn_linear` can run: CPU, float32 or bfloat16 alike, no autograd, eager.

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


def onednn_linear(inputs: Tensor, weight: Tensor, bias: Tensor | None = None, relu: bool = False) -> Tensor:
    """`inputs [N, in] @ weight [in, out] + bias [out]`, then ReLU if asked, in one oneDNN call
    (the caller checked `onednn_applies`)."""
    return torch.ops.mkldnn._linear_pointwise(inputs, weight.t(), bias, "relu" if relu else "none", [], "")
