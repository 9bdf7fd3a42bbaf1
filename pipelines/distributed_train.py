"""The train component's torchrun entry point (more than one GPU): every process trains with
the config the component already validated (a YAML file)."""

import argparse

from omegaconf import OmegaConf

from components.core.config import validate
from components.core.errors import run_cli
from components.train import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    for option in ("config", "prepared", "out", "live", "checkpoints"):
        parser.add_argument(f"--{option}", required=True)
    args = parser.parse_args()
    train(validate(OmegaConf.load(args.config), args.config), args.prepared, args.out, args.live, args.checkpoints)


if __name__ == "__main__":
    run_cli(main)
