"""torchvision imports beside whichever torch build .ci/setup installed (see sw/vision.py)."""

import sys

from tilewright.sw.vision import load_torchvision


def test_torchvision_models_import_and_build():
    tv = load_torchvision()
    assert tv is sys.modules["torchvision"]
    import torchvision  # a plain import works once load_torchvision has run

    assert torchvision is tv
    for name in ("resnet50", "inception_v3", "vgg16"):
        assert name in tv.models.list_models()
    net = tv.models.get_model("resnet18", weights=None)
    assert sum(p.numel() for p in net.parameters()) == 11_689_512


def test_load_torchvision_is_idempotent():
    assert load_torchvision() is load_torchvision()
