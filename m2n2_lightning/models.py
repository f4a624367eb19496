"""The MLP of the paper's experiments."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from m2n2_lightning.kernels import onednn_applies, onednn_linear


class MLP(nn.Module):
    """in -> hidden (ReLU) -> out, parameters laid out as the reference does.

    The flat vector is W1 [in, hidden], b1 [hidden], W2 [hidden, out], b2 [out]
    (inputs times weights, not nn.Linear's transposed [out, in]), so a split
    point falls where it falls in the reference and D = 19,210 for 64-256-10.
    Parameters start at zero: the strategies draw their own initial members.
    """

    def __init__(self, in_features: int = 64, hidden: int = 256, out_features: int = 10) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("hidden", hidden), ("out_features", out_features)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"MLP {name} must be a positive integer, got {value!r}")
        self.in_features, self.hidden, self.out_features = in_features, hidden, out_features
        self.w1 = nn.Parameter(torch.zeros(in_features, hidden))
        self.b1 = nn.Parameter(torch.zeros(hidden))
        self.w2 = nn.Parameter(torch.zeros(hidden, out_features))
        self.b2 = nn.Parameter(torch.zeros(out_features))

    def forward(self, x: Tensor) -> Tensor:
        if onednn_applies(x, self.w1):
            return onednn_linear(onednn_linear(x.flatten(1), self.w1, self.b1, relu=True), self.w2, self.b2)
        hidden = torch.relu(x.flatten(1) @ self.w1 + self.b1)
        return hidden @ self.w2 + self.b2

    def forward_population(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        """Outputs [k, N, out] of k parameter sets (by name, stacked [k, *shape]) on shared x.

        This is the `forward_population` hook of `population_forward`. On the CPU
        one candidate at a time through oneDNN (its hidden layer stays in cache;
        benchmarks/RESULTS.md compares the layouts); elsewhere two batched matmuls.
        """
        x = x.flatten(1)
        w1, b1, w2, b2 = params["w1"], params["b1"], params["w2"], params["b2"]
        if onednn_applies(x, w1):
            outs = [onednn_linear(onednn_linear(x, w1[i], b1[i], relu=True), w2[i], b2[i]) for i in range(len(w1))]
            return outs[0].unsqueeze(0) if len(outs) == 1 else torch.stack(outs)
        hidden = torch.baddbmm(b1.unsqueeze(1), x.expand(len(w1), -1, -1), w1).relu_()
        return torch.baddbmm(b2.unsqueeze(1), hidden, w2)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.hidden} -> {self.out_features}"
