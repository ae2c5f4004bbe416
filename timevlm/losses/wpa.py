"""Word-patch alignment (WPA): the Wasserstein distance between a window's text token features and its
visual patch features, both projected to one width, under the cosine cost. The transport plan comes from IPOT
(Xie et al. 2019, "A Fast Proximal Point Method for Computing Exact Wasserstein Distance"): proximal point
iterations whose inner Sinkhorn step is taken once, which converge to the exact optimal plan rather than to
an entropy-smoothed one. As in UNITER's WPA, the plan is computed without gradient and the loss is
sum_ij P_ij C_ij, so the gradient moves the features along the plan."""
from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def ipot(cost: torch.Tensor, beta: float = 0.5, iters: int = 50, inner: int = 1) -> torch.Tensor:
    """The optimal transport plan [B, n, m] between uniform marginals (1/n over rows, 1/m over columns) for the
    cost [B, n, m]. After the last iteration the column sums equal 1/m exactly, the row sums 1/n to within the
    method's convergence."""
    batch, n, m = cost.shape
    kernel = torch.exp(-cost.float() / beta)
    plan = torch.ones(batch, n, m, device=cost.device)
    sigma = torch.full((batch, m, 1), 1.0 / m, device=cost.device)
    for _ in range(iters):
        q = kernel * plan
        for _ in range(inner):
            delta = 1.0 / (n * (q @ sigma))  # [B, n, 1]
            sigma = 1.0 / (m * (q.transpose(1, 2) @ delta))  # [B, m, 1]
        plan = delta * q * sigma.transpose(1, 2)
    return plan


def cosine_cost(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """1 - cos between every token of a [B, n, F] and of b [B, m, F] -> [B, n, m], in [0, 2]."""
    return 1.0 - F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).transpose(1, 2)


def wpa_loss(text: torch.Tensor, vision: torch.Tensor, beta: float = 0.5, iters: int = 50) -> torch.Tensor:
    """The batch's mean Wasserstein distance between text [B, Kt, F] and vision [B, Kv, F] tokens."""
    cost = cosine_cost(text.float(), vision.float())
    plan = ipot(cost.detach(), beta, iters)
    return (plan * cost).sum((1, 2)).mean()
