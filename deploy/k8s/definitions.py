"""The main code location for Dagster on Kubernetes: one pod per run with the GPUs of one machine.

Deployed with Dagster's Helm chart and `values.yaml` beside this file: the K8sRunLauncher starts every run in its own
pod, with `GPUS` GPUs as its resource limits (`runK8sConfig` there, and this location's job tags here); inside the pod
the run uses the location's multiprocess executor, and the data-parallel stages (samples, labels, train) run under
torchrun with one process per GPU, launched through Dagster Pipes (StitchVMResource.nproc), so one materialisation of
`samples` fills all the pod's GPUs. The single-process GPU stages take the pod's first GPU one at a time (the `gpu`
pool: `dagster instance concurrency set gpu 1`, or `concurrency.pools` in the chart's dagster.yaml).

The assets, checks, sensor and job are the `pipelines` location's; only the resources and job tags differ.
`dagster definitions validate -f deploy/k8s/definitions.py` loads it without a cluster (tests/test_dagster_k8s.py).

Per-step pods (`k8s_job_executor`) are not used: they need dagster-k8s inside the definitions, and its newest
release (0.29.27) pins dagster 1.13.27 while this project pins 1.13.28; the run launcher needs dagster-k8s only in
the cluster's images (values.yaml says which pins).
"""
from __future__ import annotations

from dagster import Definitions, define_asset_job

import pipelines

GPUS = 8  # per run pod: the torchrun processes of the data-parallel stages, and values.yaml's nvidia.com/gpu limit
# the run pod's resources, merged by the K8sRunLauncher into the pod of every run of the job that carries it
K8S_RUN_CONFIG = {"dagster-k8s/config": {"container_config": {"resources": {
    "limits": {"nvidia.com/gpu": str(GPUS)},
    "requests": {"nvidia.com/gpu": str(GPUS), "cpu": "32", "memory": "256Gi"}}}}}

stitchvm_all = define_asset_job("stitchvm_all", selection=pipelines.stitchvm_all.selection, tags=K8S_RUN_CONFIG,
                                description=pipelines.stitchvm_all.description)

defs = Definitions(
    assets=pipelines.defs.assets,
    asset_checks=pipelines.defs.asset_checks,
    jobs=[stitchvm_all],
    sensors=pipelines.defs.sensors,
    executor=pipelines.EXECUTOR,
    resources=pipelines.resources(nproc=GPUS),
)
