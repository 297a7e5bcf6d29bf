"""TunnelService's way to the peer link: payloads go out directly (``send_nowait``) while the
link can take them, through the sender task (``send``, which waits) while it cannot, always in
order; and REFUSED answers to an OPEN flood the peer does not read stay bounded (TS9)."""

from __future__ import annotations

import asyncio

from gateway.config import TunnelSection
from gateway.tunnel import messages as m
from gateway.tunnel.sockets import MAX_QUEUED_REFUSALS, TunnelService


class FakeLink:
    """The two ways into a peer link: ``send_nowait`` (no wait) and ``send`` (may wait)."""

    def __init__(self) -> None:
        self.room = True  # what can_send_now answers
        self.gate = asyncio.Event()  # send() waits for it (a full write buffer)
        self.gate.set()
        self.direct: list[bytes] = []
        self.waited: list[bytes] = []
        self.order: list[bytes] = []

    def can_send_now(self) -> bool:
        return self.room

    def send_nowait(self, payload: bytes, via: object | None) -> None:
        assert self.room, "send_nowait called while the link said it had no room"
        self.direct.append(payload)
        self.order.append(payload)

    async def send(self, payload: bytes, via: object | None) -> None:
        await self.gate.wait()
        self.waited.append(payload)
        self.order.append(payload)


def service(link: FakeLink) -> TunnelService:
    return TunnelService(
        [TunnelSection(name="svc", connect="127.0.0.1:9")],
        initiator=True,
        send=link.send,
        is_up=lambda: True,
        send_nowait=link.send_nowait,
        can_send_now=link.can_send_now,
    )


def opens(first_sid: int, n: int) -> list[bytes]:
    # odd ids: opened by the responder, as the peer of an initiator does (TS8)
    return [m.encode_open(first_sid + 2 * i, 1 << 20, "nope") for i in range(n)]


async def until(cond: object, what: str) -> None:
    async with asyncio.timeout(5):
        while not cond():  # type: ignore[operator]
            await asyncio.sleep(0.001)


async def test_direct_while_room_then_sender_task_keeps_the_order() -> None:
    link = FakeLink()
    svc = service(link)
    await svc.start()
    try:
        for p in opens(1, 3):  # unknown name: each answered with a REFUSED
            svc.on_payload(p)
        assert len(link.direct) == 3  # handed over at once, no task step in between
        assert link.waited == []

        link.room = False  # write buffer above its high-water mark
        link.gate.clear()
        for p in opens(7, 4):
            svc.on_payload(p)
        assert len(link.direct) == 3  # nothing more went the direct way
        await until(lambda: svc.send_queue_bytes < 4 * 6, "the sender took one")
        link.room = True  # room again while the sender still holds a payload
        for p in opens(15, 2):
            svc.on_payload(p)  # must not overtake the payloads queued before
        link.gate.set()
        await until(lambda: len(link.order) == 9, "all nine answers sent")
        sids = [int.from_bytes(p[1:5]) for p in link.order]
        assert sids == [1, 3, 5, 7, 9, 11, 13, 15, 17]  # in order across both ways
        assert link.waited  # the wait really went through the sender task
        assert svc.send_queue_bytes == 0
    finally:
        await svc.stop()


async def test_refusals_to_an_unread_open_flood_stay_bounded() -> None:
    link = FakeLink()
    link.room = False
    link.gate.clear()  # the peer reads nothing: every answer waits
    svc = service(link)
    await svc.start()
    try:
        flood = 3 * MAX_QUEUED_REFUSALS
        for p in opens(1, flood):
            svc.on_payload(p)
        await asyncio.sleep(0.01)
        # at most MAX_QUEUED_REFUSALS wait (one of them may be inside the sender's send())
        assert svc.send_queue_bytes <= MAX_QUEUED_REFUSALS * 6
        assert svc.refusals_dropped >= flood - MAX_QUEUED_REFUSALS - 1
        assert svc.report().errors["refusals_dropped"] == svc.refusals_dropped
        # every OPEN is still counted as refused, answered or not
        assert svc.mux.counters["-unknown-"].refusals["unknown_tunnel"] == flood
        # once the peer reads again, answers flow and new OPENs are answered again
        link.gate.set()
        link.room = True
        await until(lambda: svc.send_queue_bytes == 0, "queue drained")
        dropped = svc.refusals_dropped
        svc.on_payload(opens(2 * flood + 1, 1)[0])
        assert svc.refusals_dropped == dropped
        assert int.from_bytes(link.order[-1][1:5]) == 2 * flood + 1
    finally:
        await svc.stop()
