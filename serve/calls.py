"""Calls from the ingress to the model deployments: cancelled with their request, retried once
when the replica under them died, and failing in the client's terms
(:func:`serve.errors.client_error`)."""

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from ray.exceptions import RayActorError

from serve.errors import client_error

T = TypeVar("T")
log = logging.getLogger("ray.serve")


async def cancelling(response: Awaitable[T]) -> T:
    """Await a deployment call; when the awaiting is cancelled, cancel the call too.

    Awaiting a ``DeploymentResponse`` does not cancel the replica's work by itself: a request
    past its deadline (or whose client left) must not keep a model busy.
    """
    try:
        return await response
    except asyncio.CancelledError:
        cancel = getattr(response, "cancel", None)
        if cancel is not None:
            cancel()
        raise


async def gather_all(calls: list[Awaitable[T]]) -> list[T]:
    """Every call's result, in order; the first failure cancels the others."""
    tasks = [asyncio.ensure_future(c) for c in calls]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        raise


async def remote(call: Awaitable[T], what: str, retry: dict[str, str]) -> T:
    """Await a deployment call; its failures as errors in the client's terms.

    Args:
        call: the call.
        what: the deployment in the client's words, e.g. ``model 'body'``.
        retry: the headers of a 503.
    """
    try:
        return await call
    except Exception as exc:
        raise client_error(exc, what, retry) from None


async def ask(make: Callable[[], Awaitable[T]], what: str, retry: dict[str, str]) -> T:
    """One deployment call (``make()``), retried once if its replica died under it.

    Serve's router stops choosing a replica that died, so the retry goes to a live one, or
    waits for the restarted one within the request's deadline.
    """
    try:
        return await cancelling(make())
    except RayActorError:  # ActorDiedError, ActorUnavailableError
        log.warning("a replica of %s died during a request; retrying it once", what)
    except Exception as exc:
        raise client_error(exc, what, retry) from None
    return await remote(cancelling(make()), what, retry)
