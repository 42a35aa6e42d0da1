import pytest
from torch import nn

from lightning_compress.claims import claim, claims, release


def test_compatible_and_conflicting_claims() -> None:
    net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    claim(net, ["0.weight", "1.weight"], "prune", "P")
    claim(net, ["0.weight"], "share", "S")
    with pytest.raises(ValueError, match="Q wants to quantize '0.weight', which S already shares"):
        claim(net, ["1.weight", "0.weight"], "quantize", "Q")
    # the refused claim left nothing behind, not even on 1.weight
    assert claims(net)["1.weight"] == {"P": "prune"}
    claim(net, ["1.weight"], "quantize", "Q")
    with pytest.raises(ValueError, match="F wants to factorize"):
        claim(net, ["1.weight"], "factorize", "F")
    release(net, "P")
    release(net, "S")
    assert claims(net) == {"1.weight": {"Q": "quantize"}}
    claim(net, ["1.weight"], "quantize", "Q")  # the same owner may claim again (e.g. a second fit)


def test_claims_are_per_model_and_kind_checked() -> None:
    a, b = nn.Linear(1, 1), nn.Linear(1, 1)
    claim(a, ["weight"], "prune", "P1")
    claim(b, ["weight"], "prune", "P2")
    with pytest.raises(ValueError, match="`kind` must be one of"):
        claim(a, ["weight"], "melt", "X")
