"""Serve's request router with one change: no request waits forever for a replica that does not exist.

Ray Serve 2.60's router (``RequestRouter._choose_replicas_with_backoff``) parks a request for as long as the
deployment has no running replica — its own docstring: "this will block indefinitely … it's up to the caller to
time out". With one replica that dies, every request then hangs until a new engine is up (≈45 s with vLLM), or
until the proxy's ``request_timeout_s``. ``FailFastRouter`` keeps Serve's power-of-two-choices routing and adds a
bound: once the deployment has had no running replica for ``no_replica_timeout_s``, waiting requests — and new
ones, at once — fail with ``NoReplicaError``, a ``BackPressureError`` that Serve's HTTP proxy already turns into
``503`` with a ``Retry-After`` header. Requests queued behind busy replicas are not affected (``max_queued_requests``
bounds those), and as soon as a replica is running again requests are routed as usual.

The router runs inside every ``DeploymentHandle`` of the deployment, the HTTP proxy's included. Serve ships the
class to the proxy by value (cloudpickle), so this module imports Ray and the standard library only.
"""

from __future__ import annotations

import asyncio
import time

from ray.serve._private.request_router.common import PendingRequest
from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter
from ray.serve._private.request_router.replica_wrapper import RunningReplica
from ray.serve.exceptions import BackPressureError


class NoReplicaError(BackPressureError):
    """The deployment has had no running replica for longer than the router may wait (an HTTP 503 + Retry-After)."""

    def __init__(self, deployment: str, waited_s: float, status_code: int = 503, retry_after_s: float | None = None):
        super().__init__(0, 0, status_code, retry_after_s)
        self.args = (deployment, waited_s, status_code, retry_after_s)  # so it pickles back through __init__
        self._message = (f"No replica of {deployment} is running (none for {waited_s:.1f} s; a new one is "
                         "starting). Retry later.")


class FailFastRouter(PowerOfTwoChoicesRequestRouter):
    """Power-of-two-choices routing that answers ``NoReplicaError`` instead of waiting for a missing replica.

    ``request_router_kwargs``: ``no_replica_timeout_s`` (how long the deployment may be without a running replica
    before waiting requests fail), ``retry_after_s`` (the Retry-After header; None: none).
    """

    def initialize_state(self, no_replica_timeout_s: float = 1.0, retry_after_s: float | None = 1.0,
                         **kwargs) -> None:
        super().initialize_state(**kwargs)
        self.no_replica_timeout_s = no_replica_timeout_s
        self.retry_after_s = retry_after_s
        self._none_since: float | None = time.monotonic()  # None while some replica is running
        # Set (and dropped) when the last replica goes away, waking the requests waiting behind busy replicas;
        # made lazily, in the loop that waits on it (this object may be built in another one, as Serve notes).
        self._emptied: asyncio.Event | None = None

    # -- knowing when the deployment has no replica ------------------------------------------------------------

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        self._note_replica_count()

    def on_replica_actor_died(self, replica_id) -> None:
        super().on_replica_actor_died(replica_id)
        self._note_replica_count()

    def _note_replica_count(self) -> None:
        if self.curr_replicas:
            self._none_since = None
        elif self._none_since is None:
            self._none_since = time.monotonic()
            if self._emptied is not None:
                self._emptied.set()
                self._emptied = None

    def _outage_s(self) -> float:
        """How long the deployment has been without a running replica (0 while one runs)."""
        return 0.0 if self._none_since is None else time.monotonic() - self._none_since

    # -- routing -----------------------------------------------------------------------------------------------

    async def _choose_replica_for_request(self, pending_request: PendingRequest, *,
                                          is_retry: bool = False) -> RunningReplica:
        """Serve's choice, raced against the outage bound. (A private hook of Ray 2.60's ``RequestRouter``: the
        only place where one request's wait can be bounded; tests/test_serve_no_replica.py pins its behaviour.)"""
        choose = asyncio.ensure_future(super()._choose_replica_for_request(pending_request, is_retry=is_retry))
        try:
            while not choose.done():
                if self._none_since is None:  # replicas exist: wait for the choice, or for the last one to go
                    if self._emptied is None:
                        self._emptied = asyncio.Event()
                    emptied = asyncio.ensure_future(self._emptied.wait())
                    await asyncio.wait({choose, emptied}, return_when=asyncio.FIRST_COMPLETED)
                    emptied.cancel()
                    continue
                left = self.no_replica_timeout_s - self._outage_s()
                if left <= 0:
                    d = self._deployment_id
                    raise NoReplicaError(f"{d.app_name}/{d.name}", self._outage_s(), 503, self.retry_after_s)
                await asyncio.wait({choose}, timeout=left)
            return choose.result()
        finally:
            choose.cancel()  # no-op once chosen; otherwise Serve's own cancel path drops the pending request
