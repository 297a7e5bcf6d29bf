"""KME simulator: two KMEs (A and B) serving ETSI GS QKD 014 over mutual TLS from one QKD link.

``qgw kme serve --config kme.toml [--kme A|B|both]``.

Pieces, from the inside out:

- :class:`KeyStore`   keys waiting at one KME for their slave SAE (each delivered once).
- :class:`LocalSupply` owns the :class:`~keysource.link.QkdLink`; makes new keys and deposits
  the copy at the other KME (directly in one process, over the sync channel in two).
- :class:`RemoteSupply` KME B in two-process mode: asks KME A for new keys over the sync
  channel; B serves only keys it received from A.
- :class:`KmeNode`    the ETSI 014 rules (who may ask what) for one KME; raises :class:`ApiError`.
- ``make_api_app`` / ``make_admin_app`` / ``make_sync_app``: aiohttp apps around a node.
- :class:`SimulatorRunner` starts the apps of one or both KMEs.
- :class:`NodeKeySource` the KeySource interface straight on a node (in-process tests).

HTTP answers follow the standard: 400 with an Error body (``"One or more keys specified are
not found on KME"`` for unknown key IDs), 401 with no body when the caller is not the named
slave or not attached to this KME, 503 with an Error body when the link has no key (exhausted,
aborted or down) or the other KME is unreachable. Key bytes are never logged.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import ssl
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

import aiohttp
from aiohttp import web

from gateway.errors import (
    KeyExhausted,
    KeyNotFound,
    KeySourceError,
    KmeBadAnswer,
    KmeUnauthorized,
    KmeUnavailable,
)
from gateway.secret import SecretBytes
from keysource import wire
from keysource.base import KeySourceCounters, KeyStatus, QkdKey, canonical_key_id, check_request
from keysource.kme_config import KmeConfig, KmeSection, split_hostport
from keysource.link import LinkExhausted, LinkParams, LinkPoolsDiffer, QkdLink, make_link
from keysource.tls import client_context, peer_common_name, server_context

if TYPE_CHECKING:
    from keysource.bb84_link import Bb84Link

log = logging.getLogger("qgw.kme")
BB84_TICK_SECONDS = 0.25  # the bb84 model's blocks run this often (in a worker thread)

Clock = Callable[[], float]
KeyList = list[tuple[str, bytes]]
Which = Literal["A", "B", "both"]
MAX_REQUEST_BYTES = 256 * 1024


class ApiError(Exception):
    """An ETSI 014 error answer. ``kind`` lets in-process callers map it without HTTP."""

    def __init__(
        self,
        status: int,
        message: str = "",
        kind: str = "bad_request",
        details: Sequence[dict[str, Any]] = (),
    ) -> None:
        super().__init__(f"{status} {message}")
        self.status = status
        self.message = message
        self.kind = kind
        self.details = list(details)


def _unauthorized() -> ApiError:
    return ApiError(401, "", kind="unauthorized")


def _not_found(ids: Sequence[str]) -> ApiError:
    details = [{"key_ID_not_found": i} for i in ids[:16]]
    return ApiError(400, wire.MSG_KEYS_NOT_FOUND, kind="not_found", details=details)


# --- key stores and supplies ---------------------------------------------------------------


@dataclass(slots=True)
class _Pending:
    key: bytes
    master: str
    slave: str

    def __repr__(self) -> str:
        return f"_Pending(master={self.master!r}, slave={self.slave!r}, key=<secret>)"


class KeyStore:
    """Keys at one KME waiting for their slave SAE. Bounded: the oldest are dropped when full."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._keys: dict[str, _Pending] = {}
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._keys)

    def put(self, keys: Sequence[tuple[str, bytes]], master: str, slave: str) -> None:
        for kid, key in keys:
            self._keys[kid] = _Pending(key, master, slave)
        while len(self._keys) > self.capacity:
            del self._keys[next(iter(self._keys))]
            self.dropped += 1

    def take(self, caller: str, master: str, ids: Sequence[str]) -> KeyList:
        """All keys or none: 401 if the caller is not their slave, 400 if any is unknown."""
        unknown: list[str] = []
        for kid in ids:
            p = self._keys.get(kid)
            if p is None or p.master != master:
                unknown.append(kid)
            elif p.slave != caller:
                raise _unauthorized()
        if unknown or len(set(ids)) != len(ids):
            raise _not_found(unknown or list(ids))
        return [(kid, self._keys.pop(kid).key) for kid in ids]


Deposit = Callable[[KeyList, str, str], Awaitable[None]]


class KeySupply(Protocol):
    """How a KME gets new keys that the other KME also holds."""

    params: LinkParams

    async def new_keys(self, number: int, size: int, master: str, slave: str) -> KeyList: ...

    async def link_view(self) -> dict[str, Any]: ...

    async def admin_set(self, changes: dict[str, Any]) -> dict[str, Any]: ...


ADMIN_FIELDS: dict[str, tuple[type, ...]] = {
    "up": (bool,),
    "eavesdropper": (bool,),
    "qber": (int, float),
    "rate_bps": (int, float),
    "flush": (bool,),
    # bb84 model only (keysource.bb84_link): the eavesdroppers and the fibre length
    "eve_ir_fraction": (int, float),
    "eve_pns_fraction": (int, float),
    "distance_km": (int, float),
}


def check_admin_changes(changes: object) -> dict[str, Any]:
    if not isinstance(changes, dict):
        raise ApiError(400, "admin body must be a JSON object")
    out: dict[str, Any] = {}
    for k, v in changes.items():
        types = ADMIN_FIELDS.get(k)
        if types is None:
            raise ApiError(400, f"unknown admin field {k!r}; known: {sorted(ADMIN_FIELDS)}")
        if not isinstance(v, types) or (bool not in types and isinstance(v, bool)):
            raise ApiError(400, f"admin field {k!r} has the wrong type")
        out[k] = v
    return out


class LocalSupply:
    """Owns the link model. ``deposit`` places the copy of new keys at the other KME.

    ``side`` is the KME this supply serves ("A" or "B"): its callers get that KME's copy of
    each key and the other KME gets its own copy (the bb84 model keeps two pools).
    """

    def __init__(
        self, link: QkdLink | Bb84Link, clock: Clock, deposit: Deposit, side: str = "A"
    ) -> None:
        self.link = link
        self.params = link.params
        self.clock = clock
        self.deposit = deposit
        self.side = side

    def take_raw(self, number: int, size: int) -> list[tuple[str, bytes, bytes]]:
        """(key ID, KME A's copy, KME B's copy) for ``number`` new keys."""
        try:
            raw = self.link.take_pairs(self.clock(), number, size)
        except LinkExhausted as exc:
            raise ApiError(503, str(exc), kind="exhausted") from None
        except LinkPoolsDiffer:  # the bb84 pipeline gave unequal keys: never serve them
            log.error("QKD link: KME A's and KME B's keys differ; both pools discarded")  # noqa: TRY400
            raise ApiError(503, "QKD link error: keys discarded", kind="exhausted") from None
        return [(str(uuid.uuid4()), a, b) for a, b in raw]

    async def new_keys(self, number: int, size: int, master: str, slave: str) -> KeyList:
        keys = self.take_raw(number, size)
        mine = [(kid, a if self.side == "A" else b) for kid, a, b in keys]
        theirs = [(kid, b if self.side == "A" else a) for kid, a, b in keys]
        await self.deposit(theirs, master, slave)
        return mine

    async def link_view(self) -> dict[str, Any]:
        return self.link.snapshot(self.clock())

    async def admin_set(self, changes: dict[str, Any]) -> dict[str, Any]:
        changes = check_admin_changes(changes)
        try:
            self.link.set(self.clock(), **changes)
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
        log.info("link changed by admin: %s", changes)
        return self.link.snapshot(self.clock())


class SyncClient:
    """mTLS client of the other KME's sync endpoint (one session, reused)."""

    def __init__(self, base_url: str, ssl_ctx: ssl.SSLContext, timeout: float) -> None:
        self.base_url = base_url.rstrip("/")
        self._ssl = ssl_ctx
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    def _sess(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self._ssl, limit=16),
                timeout=self._timeout,
            )
        return self._session

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        try:
            async with self._sess().request(method, self.base_url + path, json=body) as resp:
                data = await resp.read()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            log.warning("sync call %s %s failed: %s", method, path, type(exc).__name__)
            raise ApiError(503, "peer KME unreachable", kind="unavailable") from None
        if status != 200:
            msg = wire.parse_error_message(data) or f"peer KME answered {status}"
            kind = "exhausted" if status == 503 else "unavailable"
            raise ApiError(503 if status >= 500 else status, msg, kind=kind)
        try:
            return json.loads(data)
        except ValueError:
            raise ApiError(503, "peer KME sent a malformed answer", kind="unavailable") from None

    async def deposit(self, keys: KeyList, master: str, slave: str) -> None:
        body = {"master": master, "slave": slave, **wire.encode_key_container(keys)}
        await self.call("POST", "/sync/v1/deposit", body)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


class RemoteSupply:
    """KME B in two-process mode: new keys come from KME A, which keeps the slave's copy."""

    def __init__(self, client: SyncClient, params: LinkParams) -> None:
        self.client = client
        self.params = params

    async def new_keys(self, number: int, size: int, master: str, slave: str) -> KeyList:
        body = {"number": number, "size": size, "master": master, "slave": slave}
        answer = await self.client.call("POST", "/sync/v1/reserve", body)
        try:
            keys = wire.parse_key_container(
                json.dumps(answer).encode(), size_bits=size, number=number
            )
        except KmeBadAnswer:
            raise ApiError(503, "peer KME sent a malformed answer", kind="unavailable") from None
        return [(k.key_id, k.key.expose_secret_bytes()) for k in keys]

    async def link_view(self) -> dict[str, Any]:
        view = await self.client.call("GET", "/sync/v1/link")
        if not isinstance(view, dict):
            raise ApiError(503, "peer KME sent a malformed answer", kind="unavailable")
        return view

    async def admin_set(self, changes: dict[str, Any]) -> dict[str, Any]:
        view = await self.client.call("POST", "/sync/v1/admin", check_admin_changes(changes))
        if not isinstance(view, dict):
            raise ApiError(503, "peer KME sent a malformed answer", kind="unavailable")
        return view


# --- one KME ----------------------------------------------------------------------------------


class KmeNode:
    """The ETSI 014 rules of one KME."""

    def __init__(
        self,
        *,
        kme_id: str,
        peer_kme_id: str,
        sae_ids: Sequence[str],
        peer_sae_ids: Sequence[str],
        store: KeyStore,
        supply: KeySupply,
    ) -> None:
        self.kme_id = kme_id
        self.peer_kme_id = peer_kme_id
        self.sae_ids = frozenset(sae_ids)
        self.peer_sae_ids = frozenset(peer_sae_ids)
        self.store = store
        self.supply = supply
        self.keys_served = 0

    def _check_caller(self, caller: str | None) -> str:
        if caller is None or caller not in self.sae_ids:
            raise _unauthorized()
        return caller

    def _check_peer_sae(self, sae: str, role: str) -> None:
        if sae not in self.peer_sae_ids:
            raise ApiError(400, f"{role} SAE ID is not known to this KME's peer")

    async def status(self, caller: str | None, slave: str) -> KeyStatus:
        master = self._check_caller(caller)
        self._check_peer_sae(slave, "slave")
        view = await self.supply.link_view()
        p = self.supply.params
        count = view.get("stored_key_count")
        return KeyStatus(
            source_KME_ID=self.kme_id,
            target_KME_ID=self.peer_kme_id,
            master_SAE_ID=master,
            slave_SAE_ID=slave,
            key_size=p.key_size,
            stored_key_count=count if isinstance(count, int) else 0,
            max_key_count=p.max_key_count,
            max_key_per_request=p.max_key_per_request,
            max_key_size=p.max_key_size,
            min_key_size=p.min_key_size,
            max_SAE_ID_count=0,
            status_extension={"qgw_simulator": view},
        )

    async def enc_keys(
        self,
        caller: str | None,
        slave: str,
        number: int | None = None,
        size: int | None = None,
        *,
        additional_slaves: Sequence[object] = (),
        extension_mandatory: Sequence[object] = (),
    ) -> KeyList:
        master = self._check_caller(caller)
        self._check_peer_sae(slave, "slave")
        p = self.supply.params
        number = 1 if number is None else number
        size = p.key_size if size is None else size
        if additional_slaves:
            raise ApiError(400, "additional_slave_SAE_IDs are not supported (max_SAE_ID_count 0)")
        if extension_mandatory:
            raise ApiError(400, "not all extension_mandatory parameters are supported")
        if not 1 <= number <= p.max_key_per_request:
            raise ApiError(400, f"number shall be between 1 and {p.max_key_per_request}")
        if size % 8:
            raise ApiError(400, wire.MSG_SIZE_MULTIPLE_OF_8)
        if not p.min_key_size <= size <= p.max_key_size:
            raise ApiError(400, f"size shall be between {p.min_key_size} and {p.max_key_size}")
        keys = await self.supply.new_keys(number, size, master, slave)
        self.keys_served += len(keys)
        log.debug(
            "%s: enc_keys %d x %d bits for %s -> %s", self.kme_id, number, size, master, slave
        )
        return keys

    async def dec_keys(self, caller: str | None, master: str, ids: Sequence[str]) -> KeyList:
        slave = self._check_caller(caller)
        canon = [canonical_key_id(i) for i in ids]
        if not ids or any(c is None for c in canon):
            raise _not_found([str(i)[:64] for i in ids])
        keys = self.store.take(slave, master, [c for c in canon if c is not None])
        self.keys_served += len(keys)
        log.debug("%s: dec_keys %d keys for %s from %s", self.kme_id, len(keys), slave, master)
        return keys


# --- HTTP ---------------------------------------------------------------------------------------

NODE_KEY: web.AppKey[KmeNode] = web.AppKey("node", KmeNode)


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.json_response(obj, status=status)


@web.middleware
async def _errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        if exc.status == 401:
            return web.Response(status=401)  # the standard: 401 has no body
        return _json(wire.encode_error(exc.message, exc.details), exc.status)
    except web.HTTPException:
        raise
    except Exception:
        log.exception("internal error in %s %s", request.method, request.path)
        return _json(wire.encode_error("internal error"), 500)


def _caller(request: web.Request) -> str | None:
    transport = request.transport
    if transport is None:
        return None
    return peer_common_name(transport.get_extra_info("peercert"))


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        obj = json.loads(await request.read())
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "request body is not JSON") from None
    if not isinstance(obj, dict):
        raise ApiError(400, "request body is not a JSON object")
    return obj


def _int_param(value: object, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, str):
        if not value.isdigit() or len(value) > 9:
            raise ApiError(400, f"{name} shall be a non-negative integer")
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ApiError(400, f"{name} shall be an integer")


async def _h_status(request: web.Request) -> web.Response:
    node = request.app[NODE_KEY]
    st = await node.status(_caller(request), request.match_info["sae"])
    return _json(wire.encode_status(st))


async def _h_enc(request: web.Request) -> web.Response:
    node = request.app[NODE_KEY]
    caller = _caller(request)
    if request.method == "GET":
        q = request.query
        unknown = set(q) - {"number", "size"}
        if unknown:
            raise ApiError(400, "GET enc_keys takes only number and size")
        number, size = _int_param(q.get("number"), "number"), _int_param(q.get("size"), "size")
        extra: tuple[Sequence[object], Sequence[object]] = ((), ())
    else:
        b = await _body(request)
        number, size = _int_param(b.get("number"), "number"), _int_param(b.get("size"), "size")
        add, ext = b.get("additional_slave_SAE_IDs") or [], b.get("extension_mandatory") or []
        if not isinstance(add, list) or not isinstance(ext, list):
            raise ApiError(400, "additional_slave_SAE_IDs and extension_mandatory are arrays")
        extra = (add, ext)
    keys = await node.enc_keys(
        caller,
        request.match_info["sae"],
        number,
        size,
        additional_slaves=extra[0],
        extension_mandatory=extra[1],
    )
    return _json(wire.encode_key_container(keys))


async def _h_dec(request: web.Request) -> web.Response:
    node = request.app[NODE_KEY]
    caller = _caller(request)
    if request.method == "GET":
        ids = request.query.getall("key_ID", [])
        if len(ids) != 1 or set(request.query) != {"key_ID"}:
            raise ApiError(400, "GET dec_keys takes exactly one key_ID")
    else:
        b = await _body(request)
        items = b.get("key_IDs")
        if not isinstance(items, list) or not items:
            raise ApiError(400, "key_IDs shall be a non-empty array")
        ids = []
        for it in items:
            if not isinstance(it, dict) or not isinstance(it.get("key_ID"), str):
                raise ApiError(400, "each key_IDs item shall be an object with key_ID")
            ids.append(it["key_ID"])
    keys = await node.dec_keys(caller, request.match_info["sae"], ids)
    return _json(wire.encode_key_container(keys))


def make_api_app(node: KmeNode) -> web.Application:
    """The ETSI GS QKD 014 API of one KME (serve it with a server_context: mutual TLS)."""
    app = web.Application(middlewares=[_errors], client_max_size=MAX_REQUEST_BYTES)
    app[NODE_KEY] = node
    app.router.add_get("/api/v1/keys/{sae}/status", _h_status)
    app.router.add_route("GET", "/api/v1/keys/{sae}/enc_keys", _h_enc)
    app.router.add_route("POST", "/api/v1/keys/{sae}/enc_keys", _h_enc)
    app.router.add_route("GET", "/api/v1/keys/{sae}/dec_keys", _h_dec)
    app.router.add_route("POST", "/api/v1/keys/{sae}/dec_keys", _h_dec)
    return app


async def _h_admin_state(request: web.Request) -> web.Response:
    node = request.app[NODE_KEY]
    view = await node.supply.link_view()
    return _json(
        {
            "kme_id": node.kme_id,
            "link": view,
            "pending_for_slaves": len(node.store),
            "keys_served": node.keys_served,
        }
    )


async def _h_admin_link(request: web.Request) -> web.Response:
    node = request.app[NODE_KEY]
    view = await node.supply.admin_set(await _body(request))
    return _json({"kme_id": node.kme_id, "link": view})


async def _h_healthz(request: web.Request) -> web.Response:
    return _json({"ok": True, "kme_id": request.app[NODE_KEY].kme_id})


def make_admin_app(node: KmeNode) -> web.Application:
    """Admin endpoint (plain HTTP on loopback): GET /admin/state, POST /admin/link, /healthz."""
    app = web.Application(middlewares=[_errors], client_max_size=16 * 1024)
    app[NODE_KEY] = node
    app.router.add_get("/healthz", _h_healthz)
    app.router.add_get("/admin/state", _h_admin_state)
    app.router.add_post("/admin/link", _h_admin_link)
    return app


SYNC_PEER_KEY: web.AppKey[str] = web.AppKey("sync_peer", str)
OWNER_KEY: web.AppKey[LocalSupply | None] = web.AppKey("owner", object)  # type: ignore[arg-type]


def _sync_node(request: web.Request) -> KmeNode:
    if _caller(request) != request.app[SYNC_PEER_KEY]:
        raise _unauthorized()
    return request.app[NODE_KEY]


def _owner(request: web.Request) -> LocalSupply:
    owner = request.app[OWNER_KEY]
    if owner is None:
        raise ApiError(400, "this KME does not own the link model")
    return owner


async def _h_sync_deposit(request: web.Request) -> web.Response:
    node = _sync_node(request)
    b = await _body(request)
    master, slave = b.get("master"), b.get("slave")
    if not isinstance(master, str) or not isinstance(slave, str):
        raise ApiError(400, "deposit needs master and slave")
    if slave not in node.sae_ids or master not in node.peer_sae_ids:
        raise ApiError(400, "deposit for SAEs not attached to these KMEs")
    items = b.get("keys")
    if not isinstance(items, list) or not items:
        raise ApiError(400, "deposit needs keys")
    keys: KeyList = []
    for it in items:
        kid = canonical_key_id(it.get("key_ID")) if isinstance(it, dict) else None
        raw = it.get("key") if isinstance(it, dict) else None
        if kid is None or not isinstance(raw, str):
            raise ApiError(400, "malformed deposit")
        try:
            keys.append((kid, base64.b64decode(raw, validate=True)))
        except ValueError:
            raise ApiError(400, "malformed deposit") from None
    node.store.put(keys, master, slave)
    return _json({"stored": len(keys)})


async def _h_sync_reserve(request: web.Request) -> web.Response:
    node = _sync_node(request)
    owner = _owner(request)
    b = await _body(request)
    number, size = _int_param(b.get("number"), "number"), _int_param(b.get("size"), "size")
    master, slave = b.get("master"), b.get("slave")
    if number is None or size is None or not isinstance(master, str) or not isinstance(slave, str):
        raise ApiError(400, "reserve needs number, size, master, slave")
    if slave not in node.sae_ids or master not in node.peer_sae_ids:
        raise ApiError(400, "reserve for SAEs not attached to these KMEs")
    if number < 1 or size < 8 or size % 8:
        raise ApiError(400, "bad number or size")
    keys = owner.take_raw(number, size)  # the owner is KME A; the master is at KME B
    node.store.put([(kid, a) for kid, a, _ in keys], master, slave)
    return _json(wire.encode_key_container([(kid, b) for kid, _, b in keys]))


async def _h_sync_link(request: web.Request) -> web.Response:
    _sync_node(request)
    return _json(await _owner(request).link_view())


async def _h_sync_admin(request: web.Request) -> web.Response:
    _sync_node(request)
    return _json(await _owner(request).admin_set(await _body(request)))


def make_sync_app(node: KmeNode, peer_kme_id: str, owner: LocalSupply | None) -> web.Application:
    """KME-to-KME channel (mutual TLS; the client's CN must be the other KME's ID)."""
    app = web.Application(middlewares=[_errors], client_max_size=8 << 20)
    app[NODE_KEY] = node
    app[SYNC_PEER_KEY] = peer_kme_id
    app[OWNER_KEY] = owner
    app.router.add_post("/sync/v1/deposit", _h_sync_deposit)
    app.router.add_post("/sync/v1/reserve", _h_sync_reserve)
    app.router.add_get("/sync/v1/link", _h_sync_link)
    app.router.add_post("/sync/v1/admin", _h_sync_admin)
    return app


# --- running ------------------------------------------------------------------------------------


@dataclass(slots=True)
class Endpoints:
    """Where one running KME listens (actual ports, also when configured as 0)."""

    api: tuple[str, int]
    admin: tuple[str, int]
    sync: tuple[str, int] | None
    skip: tuple[str, int] | None = None  # Cisco SKIP API (keysource.skip_server), if served


def _node(me: KmeSection, other: KmeSection, store: KeyStore, supply: KeySupply) -> KmeNode:
    return KmeNode(
        kme_id=me.kme_id,
        peer_kme_id=other.kme_id,
        sae_ids=me.sae_ids,
        peer_sae_ids=other.sae_ids,
        store=store,
        supply=supply,
    )


class SimulatorRunner:
    """Start the apps of KME A, KME B or both (``which``) in the running event loop."""

    def __init__(
        self, cfg: KmeConfig, which: Which = "both", clock: Clock = time.monotonic
    ) -> None:
        self.cfg = cfg
        self.which = which
        self.clock = clock
        self.nodes: dict[str, KmeNode] = {}
        self.endpoints: dict[str, Endpoints] = {}
        self.link: QkdLink | Bb84Link | None = None
        self._runners: list[web.AppRunner] = []
        self._ticker: asyncio.Task[None] | None = None
        self._sync_clients: list[SyncClient] = []

    def build_nodes(self) -> dict[str, KmeNode]:
        """Create the nodes (no sockets). Exposed for in-process use without HTTP."""
        cfg, params = self.cfg, self.cfg.link.params()
        cap = params.max_key_count
        a, b = cfg.kme_a, cfg.kme_b
        store_a, store_b = KeyStore(cap), KeyStore(cap)
        if self.which == "both":
            self.link = make_link(params, self.clock())

            async def to_a(keys: KeyList, master: str, slave: str) -> None:
                store_a.put(keys, master, slave)

            async def to_b(keys: KeyList, master: str, slave: str) -> None:
                store_b.put(keys, master, slave)

            sup_a = LocalSupply(self.link, self.clock, to_b, "A")
            sup_b = LocalSupply(self.link, self.clock, to_a, "B")
            self.nodes["A"] = _node(a, b, store_a, sup_a)
            self.nodes["B"] = _node(b, a, store_b, sup_b)
        elif self.which == "A":
            self.link = make_link(params, self.clock())
            client = self._sync_client(a, b)
            sup_a = LocalSupply(self.link, self.clock, client.deposit, "A")
            self.nodes["A"] = _node(a, b, store_a, sup_a)
        else:
            client = self._sync_client(b, a)
            sup_rb = RemoteSupply(client, params)
            self.nodes["B"] = _node(b, a, store_b, sup_rb)
        return self.nodes

    def _sync_client(self, me: KmeSection, other: KmeSection) -> SyncClient:
        ctx = client_context(me.sync_cert, me.sync_key, self.cfg.sync.ca)
        c = SyncClient(other.effective_sync_url(), ctx, self.cfg.sync.timeout_seconds)
        self._sync_clients.append(c)
        return c

    async def _site(
        self, app: web.Application, hostport: str, ctx: ssl.SSLContext | None
    ) -> tuple[str, int]:
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        self._runners.append(runner)
        host, port = split_hostport(hostport)
        site = web.TCPSite(runner, host, port, ssl_context=ctx, reuse_address=True)
        await site.start()
        server = site._server  # aiohttp keeps the asyncio server here; needed for port 0
        sockets = getattr(server, "sockets", None) or []
        bound = sockets[0].getsockname() if sockets else (host, port)
        return (str(bound[0]), int(bound[1]))

    async def start(self) -> None:
        nodes = self.build_nodes()
        two_process = self.which != "both"
        for name, node in nodes.items():
            sec = self.cfg.kme_a if name == "A" else self.cfg.kme_b
            other = self.cfg.kme_b if name == "A" else self.cfg.kme_a
            api = await self._site(
                make_api_app(node), sec.listen, server_context(sec.cert, sec.key, sec.ca)
            )
            skip = None
            if sec.skip_listen is not None:
                from keysource.skip_server import make_skip_app  # noqa: PLC0415 -- import cycle

                skip = await self._site(
                    make_skip_app(node), sec.skip_listen, server_context(sec.cert, sec.key, sec.ca)
                )
            admin = await self._site(make_admin_app(node), sec.admin_listen, None)
            sync = None
            if two_process:
                owner = node.supply if isinstance(node.supply, LocalSupply) else None
                sctx = server_context(sec.sync_cert, sec.sync_key, self.cfg.sync.ca)
                sync = await self._site(
                    make_sync_app(node, other.kme_id, owner), sec.sync_listen, sctx
                )
            self.endpoints[name] = Endpoints(api, admin, sync, skip)
            log.info(
                "KME %s (%s) serving ETSI 014 on https://%s:%d for SAEs %s; admin http://%s:%d%s",
                name,
                node.kme_id,
                *api,
                ", ".join(sorted(node.sae_ids)),
                *admin,
                f"; sync https://{sync[0]}:{sync[1]}" if sync else "",
            )
            if skip is not None:
                log.info(
                    "KME %s (%s) serving Cisco SKIP on https://%s:%d", name, node.kme_id, *skip
                )

        if self.link is not None and self.link.params.model == "bb84":
            self.link.auto_advance = False  # type: ignore[union-attr]  # the ticker drives it
            self._ticker = asyncio.create_task(self._bb84_ticker())

    async def _bb84_ticker(self) -> None:
        """Run the bb84 link's due blocks in real time: claim and absorb here, compute in a
        worker thread (the event loop keeps answering ETSI 014 calls meanwhile)."""
        from keysource.bb84_link import Bb84Link, compute_block  # noqa: PLC0415

        link = self.link
        assert isinstance(link, Bb84Link)
        while True:
            for claim in [*link.drain_pending(), *link.claim(self.clock())]:
                try:
                    res = await asyncio.to_thread(compute_block, claim)
                except Exception:
                    log.exception("bb84 block %d failed; its link time is lost", claim.index)
                    continue
                link.absorb(claim, res)
                if res.abort_reason:
                    log.warning("bb84 block %d: no key: %s", claim.index, res.abort_reason)
            await asyncio.sleep(BB84_TICK_SECONDS)

    async def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None
        for r in reversed(self._runners):
            await r.cleanup()
        self._runners.clear()
        for c in self._sync_clients:
            await c.aclose()


async def serve_forever(cfg: KmeConfig, which: Which, stop: asyncio.Event) -> None:
    runner = SimulatorRunner(cfg, which)
    await runner.start()
    print("ready", flush=True)
    try:
        await stop.wait()
    finally:
        await runner.stop()


# --- KeySource straight on a node (in-process) ------------------------------------------------


def translate(exc: ApiError, op: str) -> KeySourceError:
    """Map an ETSI 014 error answer to the gateway's error tree (shared with the client)."""
    msg = f"{op}: {exc.message}" if exc.message else f"{op}: HTTP {exc.status}"
    if exc.status == 401:
        return KmeUnauthorized(f"{op}: the KME refused our SAE identity (401)")
    if exc.kind == "exhausted":
        return KeyExhausted(msg)
    if exc.kind == "unavailable":
        return KmeUnavailable(msg)
    if exc.kind == "not_found" or (op == "dec_keys" and exc.status in (400, 404)):
        return KeyNotFound(msg)
    return KeySourceError(msg)


class NodeKeySource:
    """The KeySource interface directly on a :class:`KmeNode` (no HTTP, no TLS)."""

    def __init__(self, node: KmeNode, sae_id: str, key_size_bits: int = 256) -> None:
        self.node = node
        self.sae_id = sae_id
        self.key_size_bits = key_size_bits
        self.counters = KeySourceCounters()

    async def _run(self, op: str, coro: Awaitable[KeyList]) -> list[QkdKey]:
        self.counters.requests += 1
        self.counters.attempts += 1
        try:
            raw = await coro
        except ApiError as exc:
            err = translate(exc, op)
            self.counters.count_error(err)
            raise err from None
        keys = [QkdKey(kid, SecretBytes(k)) for kid, k in raw]
        self.counters.count_keys(keys)
        return keys

    async def enc_keys(
        self, slave_sae_id: str, number: int = 1, size_bits: int | None = None
    ) -> list[QkdKey]:
        size = self.key_size_bits if size_bits is None else size_bits
        check_request(number, size)
        return await self._run(
            "enc_keys", self.node.enc_keys(self.sae_id, slave_sae_id, number, size)
        )

    async def dec_keys(self, master_sae_id: str, key_ids: Sequence[str]) -> list[QkdKey]:
        if not key_ids:
            raise ValueError("dec_keys needs at least one key ID")
        return await self._run("dec_keys", self.node.dec_keys(self.sae_id, master_sae_id, key_ids))

    async def status(self, peer_sae_id: str) -> KeyStatus:
        self.counters.requests += 1
        try:
            return await self.node.status(self.sae_id, peer_sae_id)
        except ApiError as exc:
            err = translate(exc, "status")
            self.counters.count_error(err)
            raise err from None

    async def aclose(self) -> None:
        return None
