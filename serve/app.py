"""The app builder: pydantic arguments → the Serve application for a list of bundles.

Used by ``serve run serve/config.yaml``, ``serve deploy`` and ``carclf serve`` alike.
"""

# No ``from __future__ import annotations`` here: Serve reads the builder's annotation at run
# time to turn a config's ``args`` into ``AppArgs``, and a string annotation would hand the
# builder a plain dict.

from pydantic import BaseModel, Field
from ray.serve import Application

from carclf.bundle import load_bundle
from carclf.errors import UserInputError
from serve.deployments import (
    BATCH_WAIT_TIMEOUT_S,
    EXPLAINER_MAX_ONGOING,
    EXPLAINER_MAX_QUEUED,
    MAX_BATCH_SIZE,
    ClassifierDeployment,
    ExplainerDeployment,
)
from serve.ingress import Ingress, ServeSettings


class AppArgs(BaseModel):
    """Arguments of the carclf Serve application."""

    bundles: list[str] = Field(min_length=1, description="bundle directories, one model each")
    settings: ServeSettings = Field(default_factory=ServeSettings)
    max_batch_size: int = Field(MAX_BATCH_SIZE, ge=1)
    batch_wait_timeout_s: float | None = Field(
        None, ge=0.0, description="how long a batch waits to fill; default 0 on CPU, 10 ms on GPU"
    )
    classifier_replicas: int = Field(1, ge=1)
    # The explainer is its own bounded pool (serve/deployments.py): past its replicas' slots
    # and each caller's queue, an explain is a fast 503, and predictions never wait behind it.
    explainer_replicas: int = Field(1, ge=1)
    explainer_max_ongoing_requests: int = Field(EXPLAINER_MAX_ONGOING, ge=1)
    explainer_max_queued_requests: int = Field(EXPLAINER_MAX_QUEUED, ge=1)
    # Logical CPUs reserved per replica. Small defaults let several models share a laptop;
    # onnxruntime and torch use max(1, int(cpus)) threads, never more than reserved.
    classifier_cpus: float = Field(0.5, gt=0.0)
    explainer_cpus: float = Field(0.25, gt=0.0)
    ingress_cpus: float = Field(0.1, gt=0.0)
    use_gpu: bool = False


def build_app(args: AppArgs) -> Application:
    """One classifier and one explainer per bundle, behind one FastAPI ingress."""
    classifiers, explainers, preprocess = {}, {}, {}
    batching = {
        "max_batch_size": args.max_batch_size,
        "batch_wait_timeout_s": args.batch_wait_timeout_s
        if args.batch_wait_timeout_s is not None
        else BATCH_WAIT_TIMEOUT_S["gpu" if args.use_gpu else "cpu"],
    }
    for path in args.bundles:
        info = load_bundle(path, verify=False).info
        name = info.name
        if name in classifiers:
            raise UserInputError(f"two bundles are named {name!r}; model names must be unique")
        preprocess[name] = info.preprocess.model_dump(mode="json")
        classifiers[name] = ClassifierDeployment.options(
            name=f"classifier-{name}",
            num_replicas=args.classifier_replicas,
            user_config=batching,
            ray_actor_options={
                "num_cpus": args.classifier_cpus,
                "num_gpus": 1 if args.use_gpu else 0,
            },
        ).bind(path, use_gpu=args.use_gpu)
        explainers[name] = ExplainerDeployment.options(
            name=f"explainer-{name}",
            num_replicas=args.explainer_replicas,
            max_ongoing_requests=args.explainer_max_ongoing_requests,
            max_queued_requests=args.explainer_max_queued_requests,
            ray_actor_options={"num_cpus": args.explainer_cpus},
        ).bind(path)
    ingress = Ingress.options(ray_actor_options={"num_cpus": args.ingress_cpus})
    return ingress.bind(classifiers, explainers, preprocess, args.settings.model_dump())
