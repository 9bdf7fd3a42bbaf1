"""Model zoo chosen by `model.name`: a small CNN, or a torchvision ResNet with its stem
adapted to the input channels and image size."""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from components.errors import ConfigError

RESNETS = ("resnet18", "resnet34", "resnet50")


class SmallCNN(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, width: int = 32, dropout: float = 0.25):
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True), nn.MaxPool2d(2)
            )

        self.features = nn.Sequential(block(in_channels, width), block(width, width * 2), nn.AdaptiveAvgPool2d(4))
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(width * 2 * 16, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _adapted_resnet(name: str, in_channels: int, num_classes: int, image_size: tuple[int, int]) -> nn.Module:
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    if min(image_size) < 96:
        # ImageNet's 7x7/2 stem + max-pool would shrink small images to nothing.
        model.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    return model


def build_model(name: str, in_channels: int, num_classes: int, image_size: tuple[int, int], width: int = 32, dropout: float = 0.25) -> nn.Module:
    if name == "cnn":
        return SmallCNN(in_channels, num_classes, width, dropout)
    if name in RESNETS:
        return _adapted_resnet(name, in_channels, num_classes, image_size)
    raise ConfigError(f"model.name: unknown model {name!r}; choose 'cnn' or one of {list(RESNETS)}")


def model_from_spec(spec: dict) -> nn.Module:
    """Rebuild the architecture described in model.json (weights loaded separately)."""
    return build_model(
        spec["model"]["name"], spec["channels"], len(spec["classes"]), tuple(spec["image_size"]),
        spec["model"]["width"], spec["model"]["dropout"],
    )
