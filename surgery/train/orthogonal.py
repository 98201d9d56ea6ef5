"""Training-time parametrisation that keeps a basis orthonormal while it trains."""

import torch
from torch import nn


class CayleyRotation(nn.Module):
    """W = (I + A)⁻¹(I − A)·W₀, A skew-symmetric: W keeps orthonormal columns.

    W₀ is the stored (dim × rank) basis; A starts at zero, so training starts from it exactly. (torch's
    `orthogonal` parametrisation lost orthogonality on tall matrices in our tests, hence the Cayley map.)
    """

    def __init__(self, dim: int):
        super().__init__()
        self.raw = nn.Parameter(torch.zeros(dim, dim))

    def forward(self, base: torch.Tensor) -> torch.Tensor:
        upper = self.raw.triu(1)
        skew = upper - upper.T
        eye = torch.eye(skew.shape[0], dtype=skew.dtype, device=skew.device)
        return torch.linalg.solve(eye + skew, eye - skew) @ base
