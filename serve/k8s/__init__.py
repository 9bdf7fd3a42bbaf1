"""TorchServe on Kubernetes (kustomize): the manifests in this folder, and `python -m serve.k8s`,
which writes their config.properties from conf/serve with the function the local server uses."""
