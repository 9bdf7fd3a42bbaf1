"""python -m serve up | down | status | predict FILE | drift

The local TorchServe of this project: `up` starts it (if needed) and deploys the package,
`down` stops it, `status` shows it, `predict` sends one image with the key from the key
file, `drift` compares the prediction log with the reference statistics.
"""

from __future__ import annotations

import argparse

from components.core.config.command import command_config
from components.core.errors import run_cli

STATUS_HELP = """exit status: 0 serving (every worker of every version READY), 1 TorchServe not running,
2 error (message on stderr), 3 degraded (the default version answers, some worker is not READY,
e.g. restarting), 4 down (TorchServe runs but no worker of the default version is READY, or the
model is not registered)"""


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m serve", description="The project's local TorchServe.")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str, epilog: str | None = None) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help, epilog=epilog)
        sub.set_defaults(run=name.replace("-", "_"))  # its function in serve/commands.py
        return sub

    sub = command("up", "start TorchServe if needed and deploy the package as the default version")
    sub.add_argument("--package", default="artifacts/package", help="package folder (output of the package step)")
    sub.add_argument("--stage", default=None, help="deploy the version a git tag assigns to this stage (e.g. prod) instead, "
                                                   "once `python -m components.promote check` passes its tag")
    sub.add_argument("--policy-ref", default=None, help="with --stage: the branch that deploys (e.g. origin/main), whose committed "
                                                        "gate policy and override records decide (default: the working tree's)")
    sub.add_argument("--management-url", help="a remote TorchServe's management API (token: $TORCHSERVE_MANAGEMENT_TOKEN)")
    sub.add_argument("--inference-url", help="its inference API, for the smoke test (token: $TORCHSERVE_INFERENCE_TOKEN)")
    sub.add_argument("--model-store", help="its model store, mounted on this machine")
    command("down", "stop TorchServe")
    command("check", "exit 2 with one line when a port the local server needs is taken (`make run` runs it first)")
    command("prometheus-config", "write a Prometheus config scraping this machine's server; print how to run it")
    command("token", "print the local server's inference key (renewed first when about to expire)")
    command("status", "show the server, its model versions and their workers", STATUS_HELP)
    sub = command("predict", "send one PNG/JPEG image, print the top-k labels")
    sub.add_argument("file")
    sub.add_argument("--version", default=None, help="a registered version (default: the default version)")
    sub = command("drift", "drift report of the prediction log; exit 1 above the thresholds")
    sub.add_argument("--log", default=None, help="prediction log (default: serve.state_dir/serve.prediction_log.file)")
    sub.add_argument("--package", default="artifacts/package", help="package folder holding reference_stats.json")
    sub.add_argument("--out", default=None, help="folder of drift.json and drift.html (default: serve.state_dir/drift, untracked)")
    for sub in commands.choices.values():
        sub.add_argument("overrides", nargs="*", help="config overrides, e.g. serve.inference_port=9080")
    args = parser.parse_args()
    cfg = command_config(None, args.overrides, refuse_stale=False)
    from serve import commands  # the server client, deploy and the registry load only once the config is checked

    getattr(commands, args.run)(cfg, args)


if __name__ == "__main__":
    run_cli(main)
