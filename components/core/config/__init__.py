"""The config: conf/ (Hydra) composed, validated against a typed schema, and what is derived from it.

- schema: the dataclasses declaring every key, its type, its range or its choices; no values.
- validation: a raw config checked against the schema; every problem named by its dotted key.
- compose: conf/ composed with Hydra overrides, exactly as `dvc exp run -S` does.
- params_file: params.yaml (what DVC tracks): written from conf/, read, refused when stale.
- command: the config of a command line (overrides, a params file, or params.yaml) plus local.yaml.
- sections: the config sections a step reads, and their hash.
- dvc_yaml: what dvc.yaml and artifacts.yaml derive from conf/ and the code: stage deps, the model artifact.
- __main__: `python -m components.core.config` (`make params`, the `config` stage's `--check`).
"""
