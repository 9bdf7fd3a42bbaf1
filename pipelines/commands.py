"""What each command of `python -m pipelines` and `python -m pipelines.score` does, once its command
line (pipelines/__main__.py, pipelines/score.py) has parsed its arguments and checked its config: this
module loads kfp and the steps the pipelines wrap (torch), which takes seconds, so it is imported after."""

import os
import sys
from pathlib import Path

from kfp import compiler

from components.core.config.compose import compose
from components.core.errors import ConfigError
from components.core.git import git
from components.core.paths import ROOT
from pipelines import OUT_DIR, preflight
from pipelines.graph import sweep_pipeline, training_pipeline
from pipelines.in_pod import IMAGE_COMMIT_ENV
from pipelines.local import LocalRunFailed, describe, local_data_uri, run_pipeline, shown
from pipelines.score import score_pipeline
from pipelines.submit import auth_token, check_version, client, probe, run_name, submit, upload, version_name


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


# python -m pipelines.score

def score_compile_command(args) -> None:
    preflight.check_images(args.cfg, gpu=False)  # its one task runs on the CPU image
    pipeline = score_pipeline(args.cfg, preflight.head_commit())
    out = Path(args.out or OUT_DIR / f"{pipeline.name}.yaml")
    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(pipeline, str(out))
    print(f"compile: {pipeline.name} -> {shown(out)}")


def score_run_local_command(args) -> None:
    cfg = args.cfg
    arguments = {"input_uri": _absolute(args.input or cfg.score.input), "package_uri": _absolute(args.package)}
    os.environ.setdefault(IMAGE_COMMIT_ENV, preflight.head_commit())  # this working tree plays the image
    run = run_pipeline(score_pipeline(cfg, preflight.head_commit()), arguments, Path(args.output_dir), False, cfg)
    print(describe(run))
    if run.failure:
        raise LocalRunFailed(run.failure)


def _absolute(uri: str) -> str:
    """kfp.local runs each task in its own folder: local paths are made absolute."""
    return uri if "://" in uri else str(Path(uri).resolve())
