"""The chained :class:`Server`: a stage whose output
(:class:`~pylm.chained.outlet.ToNextStage`) sends each result on to its next
stage (or to one of its branches, chosen by ``handle_stream``), with a copy
to each ``tee``."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pylm.base import Options2016, ServerOptions
from pylm.chained.outlet import Outlet, ToNextStage
from pylm.chained.stage import DEFAULT_HWM, REWIRE_MS, Stage, addresses
from pylm.errors import NoWiring, RegistryError
from pylm.liveness import Connections

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from pylm.registry.records import StageConfig

__all__ = ["Server"]


def _calls(value: str | Sequence[str] | None, what: str) -> list[str]:
    if value is None:
        return []
    calls = [value] if isinstance(value, str) else list(value)
    for call in calls:
        if not isinstance(call, str):
            raise TypeError(f"{what} must be str like 'step2.bar', got {type(call).__name__}")
    return calls


class Server(Stage):
    """A stage of a pipeline: runs the function a job names, then sends the
    result on as the payload of ``next_call`` (``'step2.bar'``) to the stage
    at ``next_address``::

        class Step1(Server):
            def foo(self, message):
                return b'you sent me ' + message

        Step1('step1', 'tcp://127.0.0.1:5555', 'tcp://127.0.0.1:5557',
              'step2.bar', 'tcp://127.0.0.1:5556').start()

    ``next_address`` may be a list: jobs are then spread over those stage
    instances, round-robin.

    Branches: ``next_call`` may be a list of calls; the stage's
    ``handle_stream(message)`` then returns ``(call, payload)`` for each
    result, choosing the branch it goes to (``call`` is one of the list, or
    its server's name). With explicit addresses, ``next_address`` is then a
    dict from each call to its address(es). Branches should meet again in
    one last stage (a :class:`Sink`), which answers the client.

    Tee: ``tee`` names more calls (``'audit.log'``; a dict call -> address
    with explicit addresses) that get a copy of every result, **without** a
    route: their stages run it and pass it on, and the last stage of a tee's
    branch keeps the result. Only the ``next_call`` line answers the client.
    """

    _pylm_framework = True
    kind = "chained"
    sends_to = "next"
    _output: ToNextStage

    def __init__(
        self,
        name: str,
        pull_address: str | None = None,
        next_address: str | Sequence[str] | dict[str, str | Sequence[str]] | None = None,
        next_call: str | Sequence[str] | None = None,
        db_address: str | None = None,
        log_address: str | None = None,
        perf_address: str | None = None,
        ping_address: str | None = None,
        log_level: int = logging.INFO,
        messages: int = sys.maxsize,
        *,
        tee: str | Sequence[str] | dict[str, str | Sequence[str]] | None = None,
        hwm: int = DEFAULT_HWM,
        **options: Unpack[ServerOptions],
    ) -> None:
        old = Options2016(log_address, perf_address, ping_address, log_level, messages)
        super().__init__(name, pull_address, db_address, old, hwm=hwm, **options)
        calls = _calls(next_call, "next_call")
        if len(calls) > 1 and type(self).handle_stream is Server.handle_stream:
            raise TypeError(
                f"stage {name!r} has {len(calls)} next calls: define"
                " handle_stream(message) to choose the branch of each result"
            )
        if isinstance(next_address, dict):
            unknown = set(next_address) - set(calls)
            if unknown or len(next_address) != len(calls):
                raise ValueError(
                    f"next_address must give the address(es) of each of {calls}, got"
                    f" {sorted(next_address)}"
                )
            self.next_addresses: list[str] = []
            outlets = [
                Outlet(call, addresses(next_address[call], "next_address")) for call in calls
            ]
        else:
            self.next_addresses = (
                [] if next_address is None else addresses(next_address, "next_address")
            )
            if len(calls) > 1 and self.next_addresses:
                raise ValueError("with several next calls, next_address is a dict call -> address")
            outlets = [Outlet(call, list(self.next_addresses)) for call in calls]
        if isinstance(tee, dict):
            tees = [Outlet(call, addresses(tee[call], "tee")) for call in tee]
        else:
            tees = [Outlet(call, []) for call in _calls(tee, "tee")]
        self._keeping: concurrent.futures.Future[None] | None = None  # the wiring kept in etcd
        self._output = ToNextStage(
            outlets,
            tees,
            name=name,
            logger=self.logger,
            curve=self.curve,
            wait_for_room=self._wait_for_room,
            choose=self.handle_stream,
            remote_error=self._remote_error,
            unrouted=self._unrouted_error,
        )

    @property
    def next_call(self) -> str | None:
        """The (first) next stage's call."""
        return self._output.next_call()

    @property
    def next_instances(self) -> set[str]:
        """The addresses of the next stage's instances this stage follows
        in the registry and is connected to."""
        outlets = self._output.outlets
        return set(outlets[0].connected) if outlets else set()

    def handle_stream(self, message: bytes) -> tuple[str, bytes]:
        """With several next calls: the call (or server name) a result goes
        to, and the payload it takes there."""
        raise NotImplementedError

    def _name_only(self) -> bool:
        return (
            super()._name_only()
            or not self._output.outlets
            or any(not outlet.addresses for outlet in self._output.all())
        )

    def _connects_to(self) -> list[str]:
        def at(outlet: Outlet) -> str:
            addresses = sorted(outlet.connected | set(outlet.addresses))
            return f"at {', '.join(addresses)}" if addresses else "(no instance yet)"

        return [f"next {outlet.call} {at(outlet)}" for outlet in self._output.outlets] + [
            f"tee {outlet.call} {at(outlet)}" for outlet in self._output.tees
        ]

    def _open_output(self) -> None:
        config = None
        output = self._output
        if not output.outlets:
            config = self._configured_next()
            output.set_outlets([Outlet(config.next, [])])
        links = Connections()  # the next stages' instances this stage reaches now
        if self.stats is not None:
            self.stats.peers = links
        if output.open(self.context, self.hwm, self._registry_client, links):
            self._poll_timeout = REWIRE_MS
        following = output.outlets[0].following
        if config is not None and following is not None:
            # The wiring came from the registry: keep it there (put back if
            # etcd loses it), on the registry's thread, for as long as this
            # stage follows its next stage (stop() ends that following).
            # A change written there (pylm topology set/apply) reroutes this
            # running stage: the serving thread switches at its next rewire.
            keeping = self._registry_client().keep_config(
                config, on_change=lambda changed: output.retarget(changed.next)
            )
            output.retargeted = self._record_next
            self._keeping = keeping  # until the stage stops following (_stop_following)

    def _stop_following(self) -> None:
        keeping, self._keeping = self._keeping, None
        if keeping is not None:
            keeping.cancel()
        super()._stop_following()

    def _record_next(self, call: str) -> None:
        """The next stage changed while running: the registry's record says
        so too (written without waiting)."""
        registration = self.registration
        if registration is not None:
            registration.update(dataclasses.replace(registration.record, next=call))

    def _configured_next(self) -> StageConfig:
        from pylm.registry.records import MalformedRecord

        try:
            config = self._registry_client().stage_config(self.name)
        except MalformedRecord as exc:
            raise RegistryError(
                f"stage {self.name!r} cannot read its next stage: config/{self.name}: {exc}"
            ) from exc
        except RegistryError as exc:  # the same kind: unavailable, access denied...
            raise type(exc)(f"stage {self.name!r} cannot read its next stage: {exc}") from exc
        if config is None:
            raise NoWiring(
                f"stage {self.name!r} has no next stage: pass next_call='<server>.<function>'"
                f" (the stage its results go to), or set it with"
                f" `pylm topology set {self.name} --next <server>.<function>`",
                stage=self.name,
            )
        return config
