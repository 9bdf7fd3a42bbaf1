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
import os
from pathlib import Path

from kfp import compiler, dsl
from omegaconf import DictConfig

from components.core.config.compose import compose
from components.core.paths import ROOT
from components.core.errors import run_cli
from pipelines import preflight
from pipelines.graph import Build, _with_cluster_settings, _with_secret_env, sections_json
from pipelines.in_pod import IMAGE_COMMIT_ENV
from pipelines.local import LocalRunFailed, describe, run_pipeline, shown
from pipelines.wrappers import score_op

OUT_DIR = ROOT / "artifacts" / "kfp"


def score_pipeline(cfg: DictConfig, commit: str):
    """score_op with the cluster settings of cfg.pipeline, on the images of `commit`; the package and
    input are run arguments."""
    from components.score import SECTIONS

    p, build = cfg.pipeline, Build(cfg, commit, retries=True)

    @dsl.pipeline(name=f"{p.name}-score", description="batch scoring of a folder or s3:// prefix with a packaged version")
    def pipeline(config: str = sections_json(cfg, SECTIONS), input_uri: str = cfg.score.input, package_uri: str = ""):
        task = score_op(config=config, expected_commit=commit, input_uri=input_uri, package_uri=package_uri)
        _with_secret_env(_with_cluster_settings(task, build, p.resources, cache=False).set_display_name("score"), p.s3_secret)

    return pipeline


def compile_command(args) -> None:
    cfg = compose(args.overrides)
    preflight.check_images(cfg, gpu=False)  # its one task runs on the CPU image
    pipeline = score_pipeline(cfg, preflight.head_commit())
    out = Path(args.out or OUT_DIR / f"{pipeline.name}.yaml")
    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(pipeline, str(out))
    print(f"compile: {pipeline.name} -> {shown(out)}")


def run_local_command(args) -> None:
    cfg = compose(args.overrides)
    arguments = {"input_uri": _absolute(args.input or cfg.score.input), "package_uri": _absolute(args.package)}
    os.environ.setdefault(IMAGE_COMMIT_ENV, preflight.head_commit())  # this working tree plays the image
    run = run_pipeline(score_pipeline(cfg, preflight.head_commit()), arguments, Path(args.output_dir), False, cfg)
    print(describe(run))
    if run.failure:
        raise LocalRunFailed(run.failure)


def _absolute(uri: str) -> str:
    """kfp.local runs each task in its own folder: local paths are made absolute."""
    return uri if "://" in uri else str(Path(uri).resolve())


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m pipelines.score", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    compile_parser = commands.add_parser("compile", help="write the batch-scoring pipeline spec (KFP IR YAML)")
    compile_parser.add_argument("--out", default=None)
    compile_parser.set_defaults(run=compile_command)
    local_parser = commands.add_parser("run-local", help="run batch scoring with kfp.local, no cluster")
    local_parser.add_argument("--input", default=None, help="folder or s3:// prefix (default: score.input)")
    local_parser.add_argument("--package", default="artifacts/package", help="package folder or s3:// prefix")
    local_parser.add_argument("--output-dir", default=str(OUT_DIR / "local"), help="kfp.local pipeline root")
    local_parser.set_defaults(run=run_local_command)
    for sub in commands.choices.values():
        sub.add_argument("overrides", nargs="*", help="Hydra overrides of conf/, e.g. score.workers=4")
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    run_cli(main)
