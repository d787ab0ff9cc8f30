"""The noise bound is exact for close router rows at any expert count (the case it exists for)."""

import pytest
import torch

from ercstudy.trainables.erc import noise_bound


def float64_bound(router: torch.Tensor) -> torch.Tensor:
    r = router.double()
    dist = (r[..., :, None, :] - r[..., None, :, :]).norm(dim=-1)
    dist.diagonal(dim1=-2, dim2=-1).fill_(float("inf"))
    return dist.amin(-1) / (2 * r.norm(dim=-1))


@pytest.mark.parametrize("n", [8, 64, 256])
def test_near_duplicate_rows_match_float64(n):
    g = torch.Generator().manual_seed(n)
    base = torch.randn(2, n // 2, 256, generator=g)
    router = torch.cat([base, base + 1e-4 * torch.randn(2, n // 2, 256, generator=g)], dim=-2)  # [L=2, n, d]
    got = noise_bound(router)
    assert got.dtype == torch.float32 and got.shape == (2, n)
    ref = float64_bound(router)
    assert ((got.double() - ref).abs() / ref).max().item() < 1e-3
