"""This machine's settings (ports, state folder, webhooks, the KFP host) live in the gitignored
local.yaml: every command reads them, no tracked file or stage notices them, and a port clash is
one line before the pipeline runs."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import yaml

from components.core.config.command import with_local_settings
from components.core.config.params_file import load_config
from components.core.config.schema import PORT_KEYS
from components.core.errors import ConfigError
from tests.helpers.project import copy_project, run
from tests.helpers.servers import free_ports


def test_local_settings_override_only_this_machines_sections(tmp_path):
    local = tmp_path / "local.yaml"
    local.write_text("serve:\n  inference_port: 9080\nevents:\n  webhooks: ['https://hooks.example.org/x']\n")
    cfg = with_local_settings(load_config(), local)
    assert (cfg.serve.inference_port, list(cfg.events.webhooks)) == (9080, ["https://hooks.example.org/x"])
    assert cfg.train == load_config().train
    local.write_text("train:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match="local.yaml: train.lr: only serve, events, pipeline.submit settings belong to this machine"):
        with_local_settings(load_config(), local)
    local.write_text("serve:\n  inference_port: nope\n")
    with pytest.raises(ConfigError, match="serve.inference_port"):
        with_local_settings(load_config(), local)


@pytest.mark.e2e
def test_moving_the_ports_dirties_nothing_and_a_clash_is_one_line_before_the_pipeline(tmp_path):
    repo = copy_project(tmp_path / "repo")
    with socket.socket() as other:  # another program already holds a port
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        free = dict(zip(PORT_KEYS, free_ports(len(PORT_KEYS))))  # not the defaults: a server may run on this machine
        ports = {**free, "metrics_port": port}
        (repo / "local.yaml").write_text("serve:\n" + "".join(f"  {key}: {value}\n" for key, value in ports.items()))
        clash = run(["python", "-m", "serve", "check"], repo, check=False)
    assert clash.returncode == 2
    assert clash.stderr.strip() == (f"error: port {port} (serve.metrics_port) on 127.0.0.1 is in use by another program: choose free "
                                    "ones in local.yaml, e.g. `serve: {inference_port: 9080}` (this machine's settings, docs/serving.md)")
    assert run(["python", "-m", "serve", "check"], repo).returncode == 0  # the port is free again
    printed = run(["python", "-m", "serve", "prometheus-config"], repo).stdout
    assert printed.strip() == "prometheus --config.file=.serve/prometheus.yml --web.listen-address=127.0.0.1:9090"
    scraped = yaml.safe_load((repo / ".serve" / "prometheus.yml").read_text())["scrape_configs"][0]["static_configs"]
    assert scraped == [{"targets": [f"127.0.0.1:{port}"]}]
    assert Path(yaml.safe_load((repo / ".serve" / "prometheus.yml").read_text())["rule_files"][0]).exists()
    assert run(["git", "status", "--porcelain"], repo).stdout == ""
    assert "match conf/" in run(["python", "-m", "components.core.config", "--check"], repo).stdout
    assert "params.yaml already up to date" in run(["python", "-m", "components.core.config"], repo).stdout
