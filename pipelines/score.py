"""The batch-scoring pipeline: one `score` task (components/score.py) over a folder or an s3://
prefix, with a package from a folder or an s3:// prefix; predictions, rejected files, drift
report and lineage as its artifacts.

    python -m pipelines.score compile [--out FILE] [overrides]
    python -m pipelines.score run-local --package artifacts/package [--input data/images] [overrides]

On a cluster, schedule it with a KFP recurring run of the compiled spec (e.g. nightly over the
day's prefix); the S3 credentials come from the secret of pipeline.s3_secret.
"""

# No `from __future__ import annotations`: KFP reads the pipeline's real annotation objects.
import argparse

from omegaconf import DictConfig

from components.core.config.compose import compose
from components.core.errors import run_cli
from pipelines import OUT_DIR


def score_pipeline(cfg: DictConfig, commit: str):
    """score_op with the cluster settings of cfg.pipeline, on the images of `commit`; the package and
    input are run arguments."""
    from kfp import dsl  # here, not above: `python -m pipelines.score` checks its config before kfp and torch load

    from components.score import SECTIONS
    from pipelines.graph import Build, _with_cluster_settings, _with_secret_env, sections_json
    from pipelines.wrappers import score_op

    p, build = cfg.pipeline, Build(cfg, commit, retries=True)

    @dsl.pipeline(name=f"{p.name}-score", description="batch scoring of a folder or s3:// prefix with a packaged version")
    def pipeline(config: str = sections_json(cfg, SECTIONS), input_uri: str = cfg.score.input, package_uri: str = ""):
        task = score_op(config=config, expected_commit=commit, input_uri=input_uri, package_uri=package_uri)
        _with_secret_env(_with_cluster_settings(task, build, p.resources, cache=False).set_display_name("score"), p.s3_secret)

    return pipeline


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m pipelines.score", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    compile_parser = commands.add_parser("compile", help="write the batch-scoring pipeline spec (KFP IR YAML)")
    compile_parser.add_argument("--out", default=None)
    compile_parser.set_defaults(run="score_compile_command")
    local_parser = commands.add_parser("run-local", help="run batch scoring with kfp.local, no cluster")
    local_parser.add_argument("--input", default=None, help="folder or s3:// prefix (default: score.input)")
    local_parser.add_argument("--package", default="artifacts/package", help="package folder or s3:// prefix")
    local_parser.add_argument("--output-dir", default=str(OUT_DIR / "local"), help="kfp.local pipeline root")
    local_parser.set_defaults(run="score_run_local_command")
    for sub in commands.choices.values():
        sub.add_argument("overrides", nargs="*", help="Hydra overrides of conf/, e.g. score.workers=4")
    args = parser.parse_args()
    args.cfg = compose(args.overrides)
    from pipelines import commands  # kfp and the steps (torch) load only once the config is checked

    getattr(commands, args.run)(args)


if __name__ == "__main__":
    run_cli(main)
