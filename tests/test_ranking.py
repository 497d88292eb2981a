import pytest
import scipy.stats
import torch

from stitchvm.value.ranking import average_ranks, pearson, recall_at_1, spearman, spearman_within_groups


def test_ranks_match_scipy_with_ties(gen):
    x = torch.randint(0, 6, (50,), generator=gen).double()
    assert torch.allclose(average_ranks(x), torch.tensor(scipy.stats.rankdata(x.numpy())))


def test_correlations_match_scipy(gen):
    x = torch.randn(200, generator=gen)
    y = x + torch.randn(200, generator=gen)
    y[::7] = y[0]  # ties
    assert spearman(x, y) == pytest.approx(scipy.stats.spearmanr(x, y).statistic, abs=1e-12)
    assert pearson(x, y) == pytest.approx(scipy.stats.pearsonr(x, y).statistic, abs=1e-12)


def test_within_groups_is_the_mean_of_per_group_spearman(gen):
    x, y = torch.randn(40, generator=gen), torch.randn(40, generator=gen)
    g = torch.arange(40) % 4
    expected = sum(scipy.stats.spearmanr(x[g == k], y[g == k]).statistic for k in range(4)) / 4
    assert spearman_within_groups(x, y, g) == pytest.approx(expected, abs=1e-12)
    # a prompt-level offset makes the pooled number high but leaves the within-prompt one unchanged
    offset = g.double() * 100
    assert spearman(x + offset, y + offset) > 0.9
    assert spearman_within_groups(x + offset, y + offset, g) == pytest.approx(expected, abs=1e-12)


def test_recall_at_1():
    m = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3]])
    assert recall_at_1(m, torch.tensor([0, 1, 1])) == pytest.approx(2 / 3)
