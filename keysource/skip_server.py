"""The KME simulator's Cisco SKIP API (draft-cisco-skip-02), beside its ETSI 014 API.

One aiohttp app per KME (``make_skip_app(node)``), served with the same mutual-TLS server
context as the ETSI 014 API on ``skip_listen`` (keysource.kme_config). It runs on the **same**
:class:`~keysource.simulator.KmeNode` as the ETSI 014 app: the same key stores, the same link
model, the same rules of who may take which key. So a key made over SKIP at KME A is fetched by
its ID over SKIP at KME B, and — deliberately — also over ETSI 014 (and the other way round):
the key ID is the same 16 bytes in both forms, and each copy is still delivered once, whichever
interface asks first (docs/keysource.md §SKIP, "Mixing the interfaces").

Methods (draft-cisco-skip-02 §4, Table 2), all ``GET``; the caller is the CN of its verified
client certificate and must be an SAE attached to this KME (else 401):

- ``/capabilities`` -> ``{"entropy": true, "key": true, "algorithm": "qkd-sim",
  "localSystemID": <caller>, "remoteSystemID": [<the other KME's SAE IDs>],
  "qgw_simulator": <link view>}`` (the last member is this simulator's extension: it carries
  ``stored_key_count`` and the link state that ETSI 014 has in its Status object).
- ``/key?remoteSystemID=<peer>[&size=<bits>]`` -> ``{"keyId": <32 hex>, "key": <hex>}``: one
  new key (ETSI 014 ``enc_keys`` with number 1); the peer's copy waits at the other KME.
- ``/key/{keyId}?remoteSystemID=<initiator>`` -> the same object: the key the initiator made for
  the caller (ETSI 014 ``dec_keys``), removed from the store.
- ``/entropy[?minentropy=<bits>]`` -> ``{"randomStr": <hex>, "minentropy": <bits>}``: random
  bytes from the OS (not a shared key, not from the link).

Status codes: 400 (a malformed or unknown parameter, an unknown ``remoteSystemID``, a size out
of range), 401 (caller not attached here, or not the system the key was made for), 404 (no such
key ID for this initiator, or already delivered), 405 (not GET, by aiohttp), 503 (no key now:
pool empty, link aborted or down; or the other KME unreachable). Error bodies are
``{"message": str}``; 401 has none. Key bytes are never logged.
"""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import Awaitable, Callable, Collection
from typing import Any

from aiohttp import web

from keysource.simulator import MAX_REQUEST_BYTES, NODE_KEY, ApiError, KmeNode
from keysource.tls import peer_common_name

log = logging.getLogger("qgw.kme.skip")

ALGORITHM = "qkd-sim"  # the capabilities' "algorithm": how the key provider makes keys
DEFAULT_ENTROPY_BITS = 256
MAX_ENTROPY_BITS = 8192
_KEY_ID_RE = re.compile(r"^[0-9a-fA-F]{32}$")


def skip_key_id(uuid_form: str) -> str:
    """The simulator's canonical UUID key ID -> SKIP ``keyId`` (32 lowercase hex digits)."""
    return uuid_form.replace("-", "").lower()


def uuid_from_skip(key_id: str) -> str | None:
    """SKIP ``keyId`` -> canonical UUID form, or None unless it is exactly 32 hex digits."""
    if not _KEY_ID_RE.match(key_id):
        return None
    v = key_id.lower()
    return f"{v[:8]}-{v[8:12]}-{v[12:16]}-{v[16:20]}-{v[20:]}"


def _attached(request: web.Request) -> tuple[KmeNode, str]:
    """The node and the caller (CN of its verified certificate); 401 unless attached here.

    Checked before anything else, so a stranger learns nothing from the parameter checks."""
    node = request.app[NODE_KEY]
    transport = request.transport
    caller = None if transport is None else peer_common_name(transport.get_extra_info("peercert"))
    if caller is None or caller not in node.sae_ids:
        raise ApiError(401, kind="unauthorized")
    return node, caller


def _query(
    request: web.Request, allowed: Collection[str], required: Collection[str] = ()
) -> dict[str, str]:
    q = request.query
    if set(q) - set(allowed):
        raise ApiError(400, f"unknown query parameter(s); this method takes {sorted(allowed)}")
    if any(len(q.getall(k)) != 1 for k in q):
        raise ApiError(400, "a query parameter is repeated")
    missing = set(required) - set(q)
    if missing:
        raise ApiError(400, f"missing query parameter(s) {sorted(missing)}")
    return {k: q[k] for k in q}


def _bits(value: str | None, name: str) -> int | None:
    if value is None:
        return None
    if not value.isdigit() or len(value) > 6:
        raise ApiError(400, f"{name} shall be a positive integer (bits)")
    return int(value)


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.json_response(obj, status=status)


@web.middleware
async def _errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        status = exc.status
        if status == 401:
            return web.Response(status=401)
        if exc.kind == "not_found":
            status = 404
        elif exc.kind in ("exhausted", "unavailable"):
            status = 503
        return _json({"message": exc.message or "error"}, status)
    except web.HTTPException as exc:  # no such path (404), not GET (405): JSON bodies too
        if exc.status < 400:
            raise
        resp = _json({"message": exc.reason}, exc.status)
        if "Allow" in exc.headers:
            resp.headers["Allow"] = exc.headers["Allow"]
        return resp
    except Exception:
        log.exception("internal error in SKIP %s %s", request.method, request.path)
        return _json({"message": "internal error"}, 500)


def _key_object(kid: str, key: bytes) -> dict[str, str]:
    return {"keyId": skip_key_id(kid), "key": key.hex()}


async def _h_capabilities(request: web.Request) -> web.Response:
    node, caller = _attached(request)
    _query(request, set())
    view = await node.supply.link_view()
    return _json(
        {
            "entropy": True,
            "key": True,
            "algorithm": ALGORITHM,
            "localSystemID": caller,
            "remoteSystemID": sorted(node.peer_sae_ids),
            "qgw_simulator": view,
        }
    )


async def _h_new_key(request: web.Request) -> web.Response:
    node, caller = _attached(request)
    q = _query(request, {"remoteSystemID", "size"}, {"remoteSystemID"})
    size = _bits(q.get("size"), "size")
    keys = await node.enc_keys(caller, q["remoteSystemID"], 1, size)
    (kid, key) = keys[0]
    return _json(_key_object(kid, key))


async def _h_key_by_id(request: web.Request) -> web.Response:
    node, caller = _attached(request)
    q = _query(request, {"remoteSystemID"}, {"remoteSystemID"})
    kid = uuid_from_skip(request.match_info["keyId"])
    if kid is None:
        raise ApiError(400, "keyId shall be 32 hexadecimal digits (128 bits)")
    keys = await node.dec_keys(caller, q["remoteSystemID"], [kid])
    (got, key) = keys[0]
    return _json(_key_object(got, key))


async def _h_entropy(request: web.Request) -> web.Response:
    _attached(request)
    q = _query(request, {"minentropy"})
    bits = _bits(q.get("minentropy"), "minentropy") or DEFAULT_ENTROPY_BITS
    if bits % 8 or not 8 <= bits <= MAX_ENTROPY_BITS:
        raise ApiError(400, f"minentropy shall be a multiple of 8 from 8 to {MAX_ENTROPY_BITS}")
    return _json({"randomStr": secrets.token_bytes(bits // 8).hex(), "minentropy": bits})


def make_skip_app(node: KmeNode) -> web.Application:
    """The SKIP API of one KME (serve it with a server_context: mutual TLS)."""
    app = web.Application(middlewares=[_errors], client_max_size=MAX_REQUEST_BYTES)
    app[NODE_KEY] = node
    app.router.add_get("/capabilities", _h_capabilities, allow_head=False)
    app.router.add_get("/key", _h_new_key, allow_head=False)
    app.router.add_get("/key/{keyId}", _h_key_by_id, allow_head=False)
    app.router.add_get("/entropy", _h_entropy, allow_head=False)
    return app
