import pytest
from torch import nn

from lightning_compress.targets import match, resolve_types, select_modules, validate_patterns


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.ModuleDict({"fc1": nn.Linear(4, 4), "fc2": nn.Linear(4, 4), "norm": nn.LayerNorm(4)})
        self.conv = nn.Conv2d(1, 2, 3)
        self.head = nn.Linear(4, 2)


def test_default_selects_all_of_types_in_order() -> None:
    assert list(select_modules(Net())) == ["encoder.fc1", "encoder.fc2", "conv", "head"]
    assert list(select_modules(Net(), types=["Linear"])) == ["encoder.fc1", "encoder.fc2", "head"]


def test_exact_glob_regex() -> None:
    net = Net()
    assert list(select_modules(net, targets=["head"])) == ["head"]
    assert list(select_modules(net, targets=["encoder.*"], types=["Linear"])) == ["encoder.fc1", "encoder.fc2"]
    assert list(select_modules(net, targets=["re:encoder\\.fc[12]"])) == ["encoder.fc1", "encoder.fc2"]
    assert list(select_modules(net, exclude=["re:.*fc2", "conv"])) == ["encoder.fc1", "head"]


def test_pattern_matching_nothing_lists_it() -> None:
    with pytest.raises(ValueError, match=r"`targets`: pattern\(s\) \['encoder\.fc3'\] match no layer") as err:
        select_modules(Net(), targets=["encoder.fc3", "head"])
    assert "encoder.fc1" in str(err.value)  # the message lists the layers that do exist
    with pytest.raises(ValueError, match=r"`exclude`: pattern\(s\) \['nope\*'\]"):
        select_modules(Net(), exclude=["nope*"])


def test_targeting_a_layer_of_unsupported_type() -> None:
    with pytest.raises(ValueError, match="'encoder.norm' is a LayerNorm, which this callback cannot handle"):
        select_modules(Net(), targets=["encoder.norm"])


def test_nothing_left() -> None:
    with pytest.raises(ValueError, match="no layer left"):
        select_modules(Net(), targets=["head"], exclude=["head"])


def test_pattern_syntax_errors() -> None:
    with pytest.raises(TypeError, match="single string"):
        validate_patterns("head", "targets")
    with pytest.raises(ValueError, match="not a valid regular expression"):
        validate_patterns(["re:("], "targets")
    with pytest.raises(ValueError, match="empty pattern"):
        validate_patterns([""], "exclude")


def test_types() -> None:
    assert resolve_types(["Linear", "torch.nn.Conv2d", nn.Embedding]) == (nn.Linear, nn.Conv2d, nn.Embedding)
    with pytest.raises(ValueError, match="unknown module type 'Lineer'"):
        resolve_types(["Lineer"])
    with pytest.raises(ValueError, match="not an nn.Module class"):
        resolve_types(["torch.Tensor"])
    assert match("a.b", "a.b") and not match("a", "a.b")


def test_excluding_a_container_leaves_out_every_layer_inside_it() -> None:
    # exclude=["encoder"] matched the container itself (not a layer), passed the "matches nothing" check and
    # left its layers in: nothing was excluded, silently
    net = Net()
    assert list(select_modules(net, exclude=["encoder"])) == ["conv", "head"]
    assert list(select_modules(net, exclude=["re:enc.*"])) == ["conv", "head"]
    assert list(select_modules(net, exclude=["encoder.fc1"])) == ["encoder.fc2", "conv", "head"]
    with pytest.raises(ValueError, match="no layer left to act on"):
        select_modules(net, targets=["encoder.*"], types=["Linear"], exclude=["encoder"])
