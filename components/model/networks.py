"""Model zoo chosen by `model.name`: a small CNN, or a torchvision ResNet with its stem
adapted to the input channels and image size."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from components.core.errors import ConfigError, DataError

RESNETS = ("resnet18", "resnet34", "resnet50")


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is 'cuda' but no CUDA device is available (use 'auto' or 'cpu')")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


class Normalize(nn.Module):
    """uint8 (N, C, H, W) -> normalised float, on whatever device the batch is on."""

    def __init__(self, mean: list[float], std: list[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1) * 255)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) / self.std


@torch.no_grad()
def predict_logits(model: nn.Module, norm: Normalize, images: torch.Tensor, device: torch.device, batch: int = 64) -> torch.Tensor:
    model.eval()
    outs = []
    for i in range(0, len(images), batch):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            outs.append(model(norm(images[i : i + batch].to(device))).float().cpu())
    return torch.cat(outs) if outs else torch.empty(0)


class SmallCNN(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, width: int, dropout: float):
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
    import torchvision  # only for the ResNets: ~half the import time of a step that trains or evaluates a CNN

    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    if min(image_size) < 96:
        # ImageNet's 7x7/2 stem + max-pool would shrink small images to nothing.
        model.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    return model


def build_model(model: dict, in_channels: int, num_classes: int, image_size: tuple[int, int]) -> nn.Module:
    """The network the model section names (`model.name`), built with that model's own settings (conf/model/<name>.yaml,
    declared in the schema's MODEL_SETTINGS): a new model is a branch here and a YAML file."""
    name = model["name"]
    if name == "cnn":
        return SmallCNN(in_channels, num_classes, model["width"], model["dropout"])
    if name in RESNETS:
        return _adapted_resnet(name, in_channels, num_classes, image_size)
    raise ConfigError(f"model.name: unknown model {name!r}; choose 'cnn' or one of {list(RESNETS)}")


def load_trained(model_dir: str | Path) -> tuple[nn.Module, Normalize, dict]:
    """The trained model (eval mode, CPU), its input normalisation and its spec (model.json)."""
    model_dir = Path(model_dir)
    spec_file, weights = model_dir / "model.json", model_dir / "model.safetensors"
    if not spec_file.exists() or not weights.exists():
        raise DataError(f"{model_dir}: no trained model (model.json + model.safetensors); run the train step first")
    spec = json.loads(spec_file.read_text())
    model = build_model(spec["model"], spec["channels"], len(spec["classes"]), tuple(spec["image_size"]))
    model.load_state_dict(load_file(weights))
    return model.eval(), Normalize(**spec["normalization"]), spec
