"""python -m pipelines compile | run-local | submit [--sweep] [Hydra overrides]

compile    writes the pipeline spec (KFP IR YAML)
run-local  runs the whole pipeline through kfp.local, prints where each artifact is
submit     compiles, then creates a run on a Kubeflow Pipelines cluster

Overrides are Hydra overrides of conf/, exactly as with `dvc exp run -S`.
"""

import argparse
from pathlib import Path

from kfp import compiler

from components.core.config import ROOT, compose
from components.core.errors import ConfigError, run_cli
from pipelines.graph import sweep_pipeline, training_pipeline
from pipelines.local import LocalRunFailed, describe, local_data_uri, run_pipeline, shown
from pipelines.submit import auth_token, data_source, run_name, submit

OUT_DIR = ROOT / "artifacts" / "kfp"


def build(args, retries: bool = True):
    """The composed config and the pipeline built from it (the config is the pipeline's default argument)."""
    cfg = compose(args.overrides)
    if not args.sweep:
        return cfg, training_pipeline(cfg, retries)
    override_sets = [trial.split() for trial in args.trial] or cfg.pipeline.sweep.trials
    trials = [(" ".join(overrides), compose([*args.overrides, *overrides])) for overrides in override_sets]
    return cfg, sweep_pipeline(cfg, trials, retries)


def compile_command(args) -> None:
    _, pipeline = build(args)
    out = Path(args.out or OUT_DIR / f"{pipeline.name}.yaml")
    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(pipeline, str(out))
    print(f"compile: {pipeline.name} -> {shown(out)}")


def run_local_command(args) -> None:
    # kfp.local sleeps between retries; locally a failure is a bug to see at once.
    cfg, pipeline = build(args, retries=False)
    deploys_locally = not args.sweep and not cfg.pipeline.deploy.management_url
    run = run_pipeline(pipeline, {"data_uri": local_data_uri(cfg)}, Path(args.output_dir), deploys_locally, cfg)
    print(describe(run))
    if run.failure:
        raise LocalRunFailed(run.failure)


def submit_command(args) -> None:
    cfg, pipeline = build(args)
    s = cfg.pipeline.submit
    host = args.host or s.host
    if not host:
        raise ConfigError("no KFP host: give --host URL (or set pipeline.submit.host)")
    if not args.sweep and not cfg.pipeline.deploy.management_url:
        raise ConfigError("pipeline.deploy.management_url is empty: a cluster run deploys to a TorchServe reachable from "
                          "the cluster; set it with pipeline.deploy.inference_url and pipeline.deploy.model_store_pvc")
    arguments = data_source(cfg)
    out = OUT_DIR / f"{pipeline.name}.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(pipeline, str(out))
    name = args.run_name or run_name(cfg, arguments["data_rev"])
    run_id = submit(out, arguments, name, host, args.namespace or s.namespace, args.experiment or s.experiment,
                    auth_token(cfg, args.token_file))
    print(f"submit: run {run_id} ({name!r}) of {shown(out)} created on {host}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m pipelines", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    compile_parser = commands.add_parser("compile", help="write the pipeline spec (KFP IR YAML)")
    compile_parser.add_argument("--out", default=None, help=f"output file (default: {OUT_DIR.relative_to(ROOT)}/<pipeline name>.yaml)")
    compile_parser.set_defaults(run=compile_command)
    local_parser = commands.add_parser("run-local", help="run the whole pipeline with kfp.local, no cluster")
    local_parser.add_argument("--output-dir", default=str(OUT_DIR / "local"), help="kfp.local pipeline root (one folder per run)")
    local_parser.set_defaults(run=run_local_command)
    submit_parser = commands.add_parser("submit", help="compile, then create a run on a KFP cluster")
    submit_parser.add_argument("--host", default=None, help="KFP API URL (default: pipeline.submit.host)")
    submit_parser.add_argument("--namespace", default=None, help="Kubernetes namespace (default: pipeline.submit.namespace)")
    submit_parser.add_argument("--experiment", default=None, help="KFP experiment (default: pipeline.submit.experiment)")
    submit_parser.add_argument("--run-name", default=None, help="default: <pipeline> commit <git commit> data <data hash> <time>")
    submit_parser.add_argument("--token-file", default=None, help="file holding the bearer token (default: $<pipeline.submit.token_env>)")
    submit_parser.add_argument("--cache", action=argparse.BooleanOptionalAction, default=None,
                               help="force KFP caching on/off for every step (default: as compiled, pipeline.caching)")
    submit_parser.set_defaults(run=submit_command)
    for sub in (compile_parser, local_parser, submit_parser):
        sub.add_argument("--sweep", action="store_true", help="the sweep pipeline: one trial per pipeline.sweep.trials entry")
        sub.add_argument("--trial", action="append", default=[], metavar="OVERRIDES",
                         help="with --sweep: one trial's overrides, space-separated, instead of pipeline.sweep.trials (repeatable)")
        sub.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. train.epochs=2 experiment=quick")
    args = parser.parse_args()
    if getattr(args, "cache", None) is not None:
        # Compiled into every task: kfp.Client's enable_caching only reaches top-level tasks, and ours sit in the exit handler.
        args.overrides.append(f"pipeline.caching={str(args.cache).lower()}")
    args.run(args)


if __name__ == "__main__":
    run_cli(main)
