"""python -m pipelines compile | run-local | upload | submit [--sweep] [Hydra overrides]

compile    checks the config, data source and deploy target, then writes the pipeline spec (KFP IR YAML)
run-local  runs the whole pipeline through kfp.local, prints where each artifact is
upload     compiles, then registers the pipeline and a version named by the commit in the KFP UI
submit     compiles, then creates a run on a Kubeflow Pipelines cluster (or runs a registered version)

Overrides are Hydra overrides of conf/, exactly as with `dvc exp run -S`.
"""

import argparse
import os
import sys
from pathlib import Path

from kfp import compiler

from components.core.config.compose import compose
from components.core.paths import ROOT
from components.core.errors import ConfigError, run_cli
from components.core.git import git
from pipelines import preflight
from pipelines.graph import sweep_pipeline, training_pipeline
from pipelines.in_pod import IMAGE_COMMIT_ENV
from pipelines.local import LocalRunFailed, describe, local_data_uri, run_pipeline, shown
from pipelines.submit import auth_token, check_version, client, probe, run_name, submit, upload, version_name

OUT_DIR = ROOT / "artifacts" / "kfp"


def build(args, data: dict, retries: bool = True):
    """The composed config and the pipeline built from it, its images and checks named by the current commit."""
    cfg, commit = args.cfg, preflight.head_commit()
    if not args.sweep:
        return training_pipeline(cfg, commit, data, retries)
    override_sets = [trial.split() for trial in args.trial] or cfg.pipeline.sweep.trials
    trials = [(" ".join(overrides), compose([*args.overrides, *overrides])) for overrides in override_sets]
    return sweep_pipeline(cfg, trials, commit, data, retries)


def compile_for_cluster(args) -> Path:
    """Check everything a cluster run needs, then write the spec; its path."""
    preflight.check_images(args.cfg)
    data = preflight.cluster_data_source(args.cfg)
    if not args.sweep:
        preflight.check_deploy_target(args.cfg)
    pipeline = build(args, data)
    out = Path(getattr(args, "out", None) or OUT_DIR / f"{pipeline.name}.yaml")
    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(pipeline, str(out))
    return out


def compile_command(args) -> None:
    out = compile_for_cluster(args)
    print(f"compile: {args.cfg.pipeline.name}{'-sweep' if args.sweep else ''} at commit {preflight.head_commit()[:10]} -> {shown(out)}")


def run_local_command(args) -> None:
    # This working tree plays the images: it is the commit the spec expects (unless the caller says otherwise).
    os.environ.setdefault(IMAGE_COMMIT_ENV, preflight.head_commit())
    # GPU scheduling is a cluster setting: here train runs on this machine's train.device.
    cfg = args.cfg = compose([*args.overrides, "pipeline.train.accelerator_count=0"])
    deploys_locally = not args.sweep and cfg.pipeline.deploy.enabled and not cfg.pipeline.deploy.management_url
    data = {"data_repo": cfg.pipeline.data.repo, "data_rev": cfg.pipeline.data.rev, "data_uri": local_data_uri(cfg)}
    # kfp.local sleeps between retries; locally a failure is a bug to see at once.
    run = run_pipeline(build(args, data, retries=False), {}, Path(args.output_dir), deploys_locally, cfg)
    print(describe(run))
    if run.failure:
        raise LocalRunFailed(run.failure)


def upload_command(args) -> None:
    if git(ROOT, "status", "--porcelain", "--untracked-files=no"):
        raise ConfigError("uncommitted changes: a pipeline version is named by its commit, so commit them first")
    c = connect(args)  # before compiling: an unreachable or refusing API is the first thing to know
    out = compile_for_cluster(args)
    name = f"{args.cfg.pipeline.name}{'-sweep' if args.sweep else ''}"
    pipeline_id, version_id = upload(c, out, name, version_name(), args.namespace or args.cfg.pipeline.submit.namespace)
    print(f"upload: pipeline {name!r} ({pipeline_id}) version {version_name()!r} ({version_id}) from {shown(out)}")


def submit_command(args) -> None:
    cfg, s = args.cfg, args.cfg.pipeline.submit
    if args.schedule and not args.pipeline_version:
        raise ConfigError("--schedule needs --pipeline-version: a recurring run runs a registered version (python -m pipelines upload)")
    c = connect(args)
    out = compile_for_cluster(args)
    name = args.run_name or run_name(cfg)
    run_id = submit(c, out, name, args.experiment or s.experiment, args.namespace or s.namespace, args.pipeline_version,
                    args.schedule)
    what = f"registered version {args.pipeline_version}" if args.pipeline_version else shown(out)
    kind = f"recurring run ({args.schedule})" if args.schedule else "run"
    print(f"submit: {kind} {run_id} ({name!r}) of {what} created on {c.host_url}")


def connect(args):
    """A client of the KFP API at --host, pipeline.submit.host or $KF_PIPELINES_ENDPOINT, checked to be that API (not an
    auth proxy's login page) and recent enough for this pipeline."""
    s = args.cfg.pipeline.submit
    host = args.host or s.host or os.environ.get("KF_PIPELINES_ENDPOINT", "")
    if not host:
        raise ConfigError("no KFP host: give --host URL (or set pipeline.submit.host or $KF_PIPELINES_ENDPOINT)")
    token = auth_token(args.cfg, args.token_file)
    server = probe(host, token, f"--token-file or ${s.token_env}")
    warning = check_version(server, host)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    return client(host, args.namespace or s.namespace, token, server)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipelines", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    compile_parser = commands.add_parser("compile", help="check, then write the pipeline spec (KFP IR YAML)")
    compile_parser.add_argument("--out", default=None, help=f"output file (default: {OUT_DIR.relative_to(ROOT)}/<pipeline name>.yaml)")
    compile_parser.set_defaults(run=compile_command)
    local_parser = commands.add_parser("run-local", help="run the whole pipeline with kfp.local, no cluster")
    local_parser.add_argument("--output-dir", default=str(OUT_DIR / "local"), help="kfp.local pipeline root (one folder per run)")
    local_parser.set_defaults(run=run_local_command)
    upload_parser = commands.add_parser("upload", help="register the pipeline and a version named by the commit")
    upload_parser.set_defaults(run=upload_command)
    submit_parser = commands.add_parser("submit", help="compile, then create a run on a KFP cluster")
    submit_parser.add_argument("--experiment", default=None, help="KFP experiment (default: pipeline.submit.experiment)")
    submit_parser.add_argument("--run-name", default=None, help="default: <pipeline> commit <git commit> data <data hash> <time>")
    submit_parser.add_argument("--pipeline-version", default=None, metavar="VERSION_ID",
                               help="run this registered pipeline version (python -m pipelines upload) instead of the fresh spec")
    submit_parser.add_argument("--schedule", default=None, metavar="CRON",
                               help="with --pipeline-version: a recurring run on this cron schedule (e.g. '0 0 3 * * *')")
    submit_parser.add_argument("--cache", action=argparse.BooleanOptionalAction, default=None,
                               help="force KFP caching on/off for every step (default: as compiled, pipeline.caching)")
    submit_parser.set_defaults(run=submit_command)
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
    args.run(args)


if __name__ == "__main__":
    run_cli(main)
