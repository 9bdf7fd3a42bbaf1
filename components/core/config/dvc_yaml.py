"""Everything dvc.yaml (and GTO's artifacts.yaml) derives from conf/ and the code, written as text so
the rest of the file (comments, layout) stays: each step stage's code deps (the import closure of its
module) and the model artifact's declaration (package.model_name).

`python -m components.core.config.dvc_yaml` rewrites both; `make params` (`python -m components.core.config`)
rewrites the artifact declaration, which follows conf/; the code deps follow the code."""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

from components.core.config.params_file import load_config
from components.core.errors import ConfigError
from components.core.io import write_bytes_atomic
from components.core.lineage import module_file, source_files
from components.core.paths import ROOT

STEP_STAGES = {"config": "components.core.config.__main__", "prepare": "components.prepare", "train": "components.train",
               "evaluate": "components.evaluate", "package": "components.package", "score": "components.score"}
DVC_FILES = (ROOT / "dvc.yaml", ROOT / "serve" / "batch" / "dvc.yaml")
ARTIFACTS_HEADER = ("# GTO's index of this repository's artifacts, generated from conf/ (package.model_name) by\n"
                    "# `python -m components.core.config` with `artifacts:` in dvc.yaml; never hand-edited.\n")


def declared_code_files(module: str) -> tuple[str, ...]:
    """The `CODE_FILES` a step declares (a literal tuple), read from its source as its imports are: nothing here
    imports a step; at run time the step passes them to lineage itself."""
    for node in ast.parse(module_file(module).read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(isinstance(target, ast.Name) and target.id == "CODE_FILES" for target in node.targets):
            return tuple(ast.literal_eval(node.value))
    return ()


def stage_code_deps(stage: str) -> list[str]:
    """The code deps dvc.yaml must list for `stage`: the import closure of its module, plus what it ships."""
    return source_files(STEP_STAGES[stage], declared_code_files(STEP_STAGES[stage]))


def write_code_deps(dvc_yaml: Path = ROOT / "dvc.yaml") -> None:
    """Rewrite the code deps of every step stage in dvc.yaml (other deps, comments and layout stay)."""
    out, stage = [], None
    for line in dvc_yaml.read_text().splitlines():
        if line.startswith("  ") and not line.startswith("   ") and line.rstrip().endswith(":"):
            stage = line.strip().rstrip(":")
        if _is_code_dep(line) and stage in STEP_STAGES:
            if not _is_code_dep(out[-1]):
                out += [f"      - {name}" for name in stage_code_deps(stage)]
            continue
        out.append(line)
    write_bytes_atomic(dvc_yaml, ("\n".join(out) + "\n").encode())


def _is_code_dep(line: str) -> bool:
    return line.startswith("      - ") and line[8:].startswith(("components/", "serve/"))


def stale_artifact_files(model_name: str, root: Path = ROOT) -> dict[Path, str]:
    """The files that do not declare the model artifact (the package) as `model_name`, with the text they must
    read: GTO's index artifacts.yaml whole, dvc.yaml with only its `artifacts:` section replaced (the rest stays)."""
    desc = f"Image classifier packaged as ONNX + TorchServe archive (model.onnx, signature.json, {model_name}.mar)"
    index = (f"{ARTIFACTS_HEADER}{model_name}:\n  type: model\n  path: artifacts/package\n  description: {desc}\n"
             "  labels: [onnx, torchserve]\n")
    section = ["artifacts:", f"  {model_name}:", "    path: artifacts/package", "    type: model", f"    desc: {desc}",
               "    labels: [onnx, torchserve]"]
    lines = (root / "dvc.yaml").read_text().splitlines()
    start = lines.index("artifacts:") if "artifacts:" in lines else len(lines)
    end = next((i for i in range(start + 1, len(lines)) if lines[i][:1] not in ("", " ", "#")), len(lines))
    while end > start + 1 and lines[end - 1][:1] in ("", "#"):  # blank lines and comments before the next key are its own
        end -= 1
    wanted = {root / "artifacts.yaml": index, root / "dvc.yaml": "\n".join(lines[:start] + section + lines[end:]) + "\n"}
    return {path: text for path, text in wanted.items() if not path.exists() or path.read_text() != text}


def write_artifacts(model_name: str, root: Path = ROOT) -> list[str]:
    """Declare the model artifact as `model_name` in artifacts.yaml and dvc.yaml; returns the files rewritten."""
    stale = stale_artifact_files(model_name, root)
    for path, text in stale.items():
        write_bytes_atomic(path, text.encode())
    return [path.name for path in stale]


def check_artifacts(model_name: str, root: Path = ROOT) -> None:
    """Refuse artifact declarations that do not name the model as conf/ does (`gto register <name>`,
    `dvc artifacts get . <name>` and the stage tags the deploy workflow reads all go by them)."""
    stale = []
    for path in stale_artifact_files(model_name, root):
        loaded = (yaml.safe_load(path.read_text()) if path.exists() else None) or {}
        declared = list((loaded.get("artifacts") if path.name == "dvc.yaml" else loaded) or {})
        stale.append(f"{path.name} is stale (declares {declared}{' with other fields' if declared == [model_name] else ''})")
    if stale:
        raise ConfigError(f"{'; '.join(stale)}: params.yaml names the model artifact {model_name!r} (package.model_name, from data.name). "
                          "Run `make params`, which writes the declarations from conf/ (choose the dataset in conf/config.yaml: "
                          "`dvc exp run -S data...` cannot declare its artifact).")


if __name__ == "__main__":
    for dvc_file in DVC_FILES:
        write_code_deps(dvc_file)
    write_artifacts(load_config().package.model_name)
    print(f"{', '.join(str(f.relative_to(ROOT)) for f in DVC_FILES)}: code deps of every stage rewritten from the import closure, "
          "the model artifact declared from params.yaml")
