"""OWL layer-wise sparsities against the reference formula (luuyin/OWL lib/prune_all.py, prune_wanda_outlier)."""

import numpy as np
import pytest

from llmmem.pruning.profiles import OWL_FLOOR, owl_from_ratios


def _owl_reference(all_layer_ratio, sparsity_ratio, Lamda):
    """Re-implemented from prune_wanda_outlier: min-max scale into [0, 2 Lamda], re-centre the plain mean on
    the target density, then per layer ``layer_sparsity_ratio = 1 - all_layer_ratio[i]`` and
    ``if layer_sparsity_ratio <= 0: layer_sparsity_ratio = 0.01``."""
    all_layer_ratio = np.array(all_layer_ratio)
    all_layer_ratio = ((all_layer_ratio - all_layer_ratio.min())
                       * (1 / (all_layer_ratio.max() - all_layer_ratio.min()) * Lamda * 2))
    all_layer_ratio = all_layer_ratio - np.mean(all_layer_ratio) + (1 - sparsity_ratio)
    out = []
    for i in range(len(all_layer_ratio)):
        layer_sparsity_ratio = 1 - all_layer_ratio[i]
        if layer_sparsity_ratio <= 0:
            layer_sparsity_ratio = 0.01
        out.append(layer_sparsity_ratio)
    return out


# outlier ratios with one outlier-heavy block (as in real models: the first blocks), and a spread-out set
SKEWED = [0.0021, 0.0019, 0.0020, 0.0023, 0.0018, 0.0022, 0.0020, 0.0150]
SPREAD = [0.004, 0.009, 0.006, 0.012, 0.003, 0.010, 0.007, 0.005, 0.011, 0.008]


@pytest.mark.parametrize("target", [0.1, 0.5, 0.7])
@pytest.mark.parametrize("ratios", [SKEWED, SPREAD], ids=["skewed", "spread"])
@pytest.mark.parametrize("lam", [0.08, 0.2])
def test_owl_equals_the_reference_at_every_target(target, ratios, lam):
    ours = owl_from_ratios(ratios, target, lam, sizes=[7] * len(ratios))
    assert ours == _owl_reference(ratios, target, lam)  # bit for bit, clamped blocks included


def test_low_target_clamps_to_the_reference_floor_not_zero():
    ours = owl_from_ratios(SKEWED, 0.1, 0.08)
    assert ours[-1] == OWL_FLOOR == 0.01  # 1 - density < 0 for the outlier-heavy block
    assert min(ours) == 0.01 and np.mean(ours) > 0.1  # as in the reference, the clamp lifts the mean
    assert owl_from_ratios(SKEWED, 0.5, 0.08)[-1] == pytest.approx(0.5 + np.mean(
        (np.array(SKEWED) - min(SKEWED)) / (max(SKEWED) - min(SKEWED)) * 0.16) - 0.16)


def test_weighted_mean_is_a_named_option():
    sizes = [1, 1, 1, 1, 1, 1, 1, 5]
    w = owl_from_ratios(SKEWED, 0.5, 0.08, sizes=sizes, mean="weighted")
    assert np.average(1 - np.array(w), weights=sizes) == pytest.approx(0.5)
    assert w != owl_from_ratios(SKEWED, 0.5, 0.08, sizes=sizes)
    with pytest.raises(ValueError, match="mean"):
        owl_from_ratios(SKEWED, 0.5, 0.08, mean="median")
