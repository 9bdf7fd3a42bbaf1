"""python -m pipelines compile | run-local | upload | submit [--sweep] [Hydra overrides]

compile    checks the config, data source and deploy target, then writes the pipeline spec (KFP IR YAML)
run-local  runs the whole pipeline through kfp.local, prints where each artifact is
upload     compiles, then registers the pipeline and a version named by the commit in the KFP UI
submit     compiles, then creates a run on a Kubeflow Pipelines cluster (or runs a registered version)

Overrides are Hydra overrides of conf/, exactly as with `dvc exp run -S`.
"""

import argparse

from components.core.config.compose import compose
from components.core.errors import run_cli
from components.core.paths import ROOT
from pipelines import OUT_DIR


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipelines", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    compile_parser = commands.add_parser("compile", help="check, then write the pipeline spec (KFP IR YAML)")
    compile_parser.add_argument("--out", default=None, help=f"output file (default: {OUT_DIR.relative_to(ROOT)}/<pipeline name>.yaml)")
    compile_parser.set_defaults(run="compile_command")
    local_parser = commands.add_parser("run-local", help="run the whole pipeline with kfp.local, no cluster")
    local_parser.add_argument("--output-dir", default=str(OUT_DIR / "local"), help="kfp.local pipeline root (one folder per run)")
    local_parser.set_defaults(run="run_local_command")
    upload_parser = commands.add_parser("upload", help="register the pipeline and a version named by the commit")
    upload_parser.set_defaults(run="upload_command")
    submit_parser = commands.add_parser("submit", help="compile, then create a run on a KFP cluster")
    submit_parser.add_argument("--experiment", default=None, help="KFP experiment (default: pipeline.submit.experiment)")
    submit_parser.add_argument("--run-name", default=None, help="default: <pipeline> commit <git commit> data <data hash> <time>")
    submit_parser.add_argument("--pipeline-version", default=None, metavar="VERSION_ID",
                               help="run this registered pipeline version (python -m pipelines upload) instead of the fresh spec")
    submit_parser.add_argument("--schedule", default=None, metavar="CRON",
                               help="with --pipeline-version: a recurring run on this cron schedule (e.g. '0 0 3 * * *')")
    submit_parser.add_argument("--cache", action=argparse.BooleanOptionalAction, default=None,
                               help="force KFP caching on/off for every step (default: as compiled, pipeline.caching)")
    submit_parser.set_defaults(run="submit_command")
    for sub in (upload_parser, submit_parser):
        sub.add_argument("--host", default=None, help="KFP API URL (default: pipeline.submit.host, else $KF_PIPELINES_ENDPOINT)")
        sub.add_argument("--namespace", default=None, help="Kubernetes namespace (default: pipeline.submit.namespace)")
        sub.add_argument("--token-file", default=None, help="file holding the bearer token (default: $<pipeline.submit.token_env>)")
    for sub in (compile_parser, local_parser, upload_parser, submit_parser):
        sub.add_argument("--sweep", action="store_true", help="the sweep pipeline: one trial per pipeline.sweep.trials entry")
        sub.add_argument("--trial", action="append", default=[], metavar="OVERRIDES",
                         help="with --sweep: one trial's overrides, space-separated, instead of pipeline.sweep.trials (repeatable)")
        sub.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. train.epochs=2 experiment=quick")
    return parser


def main() -> None:
    args = parser().parse_args()
    if getattr(args, "cache", None) is not None:
        # Compiled into every task: kfp.Client's enable_caching only reaches top-level tasks, and ours sit in the exit handler.
        args.overrides.append(f"pipeline.caching={str(args.cache).lower()}")
    args.cfg = compose(args.overrides)
    from pipelines import commands  # kfp and the steps (torch) load only once the config is checked

    getattr(commands, args.run)(args)


if __name__ == "__main__":
    run_cli(main)
