"""The app builder: :class:`serve.settings.AppArgs` → the Serve application for its bundles.

Used by ``serve run serve/config.yaml``, ``serve deploy`` and ``carclf serve`` alike. One
classifier and one explainer per bundle, behind one FastAPI ingress; each deployment takes
Serve's options from its own section of the arguments, and every one is bounded (each caller
queues at most ``max_queued_requests`` in front of a model, past which the ingress answers 503
with ``Retry-After``).
"""

# No ``from __future__ import annotations`` here: Serve reads the builder's annotation at run
# time to turn a config's ``args`` into ``AppArgs``, and a string annotation would hand the
# builder a plain dict.

from ray.serve import Application

from carclf.bundle import load_ref
from carclf.errors import UserInputError
from serve.deployments import ClassifierDeployment, ExplainerDeployment
from serve.ingress import Ingress
from serve.settings import CLASSIFIER_PREFIX, EXPLAINER_PREFIX, AppArgs


def build_app(args: AppArgs) -> Application:
    """One classifier and one explainer per bundle, behind one FastAPI ingress."""
    classifiers, explainers, preprocess = {}, {}, {}
    shared = args.every_deployment()
    classifier = args.classifier.serve_options()
    classifier["ray_actor_options"]["num_gpus"] = 1 if args.use_gpu else 0
    for path in args.bundles:
        # A pinned reference (path@sha256:<hex>) is checked here and again in every replica.
        info = load_ref(path, verify=False).info
        name = info.name
        if name in classifiers:
            raise UserInputError(f"two bundles are named {name!r}; model names must be unique")
        preprocess[name] = info.preprocess.model_dump(mode="json")
        classifiers[name] = ClassifierDeployment.options(
            name=CLASSIFIER_PREFIX + name,
            **classifier,
            **shared,
            user_config=args.classifier.batching(args.use_gpu),
        ).bind(path, use_gpu=args.use_gpu)
        explainers[name] = ExplainerDeployment.options(
            name=EXPLAINER_PREFIX + name, **args.explainer.serve_options(), **shared
        ).bind(path)
    ingress = Ingress.options(**args.ingress.serve_options(), **shared)
    return ingress.bind(classifiers, explainers, preprocess, args.ingress.model_dump())
