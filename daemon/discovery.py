"""mDNS / DNS-SD discovery: advertise this node, browse for the others, propose them.

Every node registers one `_ctxfs._tcp.local.` service: instance `ctxfs-<first
32 hex digits of the node id>`, the listen port, its addresses, and a TXT
record with `id` (the full node id), `v` (protocol version) and `root` (hex of
the node's Merkle root, re-published when it changes, at most every
TXT_UPDATE_MIN_SECONDS). Every other node it sees is handed to
`node.discovered(node_id, (address, port))`, which keeps a connection to it.
Discovery is unauthenticated: it only proposes addresses; TLS decides who is a
member. It never decides that a peer is gone either (zeroconf keeps a silent
host for ~19 minutes): the connection's own heartbeat does.

zeroconf under trio (see docs/mdns-notes.md for what was measured):

- `Zeroconf` runs its own asyncio loop in a thread of its own (`zc.loop`).
  It is constructed in a trio worker thread (it opens sockets).
- It is driven only through `async_*` methods, run on its loop with
  `asyncio.run_coroutine_threadsafe`; trio waits on a `trio.Event` set from
  the future's done-callback through `TrioToken.run_sync_soon` (`_on_loop`).
  No trio worker thread is parked, and a cancelled trio wait cancels the
  asyncio task.
- The browser is created inside zeroconf's loop (made elsewhere it sends no
  queries). Its handler never blocks: it reads the cache, or starts an
  asyncio task to ask the network, and hands results to trio with
  `run_sync_soon`, whose callback only does `send_nowait` on a bounded
  channel and swallows every channel error (an exception there would crash
  trio). Events dropped on a full channel are recovered by a cache rescan.
- Shutdown: browser cancelled and service unregistered (goodbye packets) on
  zeroconf's loop, then the blocking `zc.close()` in a trio worker thread,
  both shielded and bounded.
- Name probing is skipped (`cooperating_responders=True`): instance names
  derive from node ids, which are unique; probing only adds ~1 s to a start.
- zeroconf's browser stops querying soon after start and ignores unchanged
  re-announcements, so a host that missed our first announcement (its link
  was down, it started later on a partitioned segment) learns of us only
  from a re-announcement: one is sent every `announce_seconds`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import ipaddress
import logging
import random
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import trio
from zeroconf import Error as ZeroconfError
from zeroconf import (
    InterfaceChoice,
    IPVersion,
    NotRunningException,
    ServiceInfo,
    ServiceStateChange,
    Zeroconf,
)
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo

from daemon.config import format_address
from daemon.logs import RateLimitedLog
from sync.messages import PROTOCOL_VERSIONS

log = logging.getLogger(__name__)
_errors = RateLimitedLog(log)

SERVICE_TYPE = "_ctxfs._tcp.local."
# A DNS label is at most 63 bytes: the instance name carries half the id
# (128 bits, unique enough to name it); the full id is in the TXT record.
INSTANCE_ID_DIGITS = 32
# Re-announce this often (jittered ±10 %): ~300 bytes of multicast per node.
DEFAULT_ANNOUNCE_SECONDS = 10.0
# The TXT `root` is re-published at most this often.
TXT_UPDATE_MIN_SECONDS = 0.5
# Events from zeroconf's thread waiting for the trio side.
EVENT_QUEUE = 128
# Services tracked at most (a LAN flooding adverts cannot grow this, nor
# the node's dial loops, without bound); and network look-ups at once.
MAX_SERVICES = 256
MAX_RESOLVING = 32
RESOLVE_TIMEOUT_MS = 3000
# The one-connection-per-pair rule (daemon/peer.py) keeps the smaller node
# id's dial, so the side with the smaller id dials a newly seen peer at once;
# the other waits this long for that connection before dialling itself (the
# peer may not have seen us, or may not reach us). Dialling both ways at once
# only makes a connection that the rule then drops.
DIAL_GRACE_SECONDS = 2.0
# Shutdown: goodbyes and zeroconf's own close, each at most this long.
STOP_BOUND = 3.0
# DNS constants (zeroconf keeps its own private).
_TYPE_PTR = 12
_CLASS_IN = 1

_WILDCARDS = {"", "0.0.0.0", "::"}
# What a call on zeroconf's loop raises when zeroconf is stopping or broken.
_LOOP_ERRORS = (OSError, NotRunningException, asyncio.CancelledError, concurrent.futures.CancelledError)


# --------------------------------------------------------------------------
# addresses
# --------------------------------------------------------------------------


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None


def _local_networks() -> list[tuple[str, ipaddress.IPv4Network | ipaddress.IPv6Network]]:
    """(address, network) of every address on this host's interfaces."""
    import ifaddr  # a dependency of zeroconf

    found = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            address = ip.ip if isinstance(ip.ip, str) else ip.ip[0]
            try:
                found.append((address, ipaddress.ip_interface(f"{address}/{ip.network_prefix}").network))
            except ValueError:
                continue
    return found


def mdns_interfaces(listen_host: str, interfaces: Sequence[str]) -> tuple[list[str] | InterfaceChoice, IPVersion | None]:
    """Where zeroconf runs: the given interface addresses; else the listen
    address if it is a specific one; else every IPv4 interface."""
    if interfaces:
        return list(interfaces), None
    if listen_host not in _WILDCARDS and _ip(listen_host) is not None:
        return [listen_host], None
    # InterfaceChoice.Default needs a default route (fails with ENODEV in an
    # isolated network); All with IPv4 only skips `::1`, which cannot work.
    return InterfaceChoice.All, IPVersion.V4Only


def advertised_addresses(listen_host: str, interfaces: Sequence[str]) -> list[str]:
    """What peers are told to dial: the listen address if it is a specific
    one (nothing else accepts); else the given interface addresses; else
    every address of this host, loopback only if there is nothing else."""
    if listen_host not in _WILDCARDS and _ip(listen_host) is not None:
        return [listen_host]
    if interfaces:
        return [i for i in interfaces if _ip(i) is not None]
    everything = [a for a, _ in _local_networks() if (ip := _ip(a)) is not None and ip.version == 4]
    outside = [a for a in everything if not _ip(a).is_loopback]
    return outside or everything


def best_address(addresses: Sequence[str], networks: Sequence[Any]) -> str | None:
    """The one address of a peer to dial (one dial loop per peer, not per address).

    Preferred: an address on one of our networks; then IPv4; then global
    IPv6; then link-local IPv6 (scoped); loopback last unless it is ours.
    """

    def rank(text: str) -> tuple[int, int]:
        ip = _ip(text)
        if ip is None:
            return (9, 0)
        if any(ip in net for net in networks if net.version == ip.version):
            return (0, 0)
        if ip.is_loopback:
            return (5, 0)
        if ip.version == 4:
            return (1, 0)
        if ip.is_link_local:
            return (3, 0) if "%" in text else (4, 0)
        return (2, 0)

    candidates = sorted(addresses, key=rank)
    if not candidates or rank(candidates[0])[0] == 9:
        return None
    return candidates[0]


def _is_node_id(text: object) -> bool:
    return isinstance(text, str) and len(text) == 64 and all(c in "0123456789abcdef" for c in text)


# --------------------------------------------------------------------------
# the trio <-> zeroconf bridge
# --------------------------------------------------------------------------


async def _on_loop(zc: Zeroconf, fn: Callable[..., Any], *args: Any) -> Any:
    """`await fn(*args)` on zeroconf's asyncio loop; trio waits on an Event, no worker thread.

    Cancelling the trio side cancels the asyncio task.
    """
    token = trio.lowlevel.current_trio_token()
    done = trio.Event()

    def wake(_future: object) -> None:
        try:
            token.run_sync_soon(done.set)
        except trio.RunFinishedError:
            pass

    coro = fn(*args)
    try:
        future = asyncio.run_coroutine_threadsafe(coro, zc.loop)
    except RuntimeError:  # the loop is closed
        coro.close()
        raise NotRunningException from None
    future.add_done_callback(wake)
    try:
        await done.wait()
    except BaseException:
        future.cancel()
        raise
    return future.result()


@attrs.frozen
class Sighting:
    """What another node's advert said last."""

    node_id: str
    address: str
    port: int
    txt: dict  # str -> str | None

    @property
    def peer(self) -> tuple[str, tuple[str, int]]:
        return self.node_id, (self.address, self.port)

    @property
    def root(self) -> str | None:
        return self.txt.get("root")


class Discovery:
    """One node's discovery: state shared by its trio tasks and its handler on zeroconf's loop.

    Attributes named `_loop_*` are touched only on zeroconf's loop; the rest
    only on trio's thread.
    """

    def __init__(self, node: Any, zc: Zeroconf, *, port: int, addresses: list[str],
                 networks: list[Any], announce_seconds: float) -> None:
        self.node = node
        self.zc = zc
        self.port = port
        self.addresses = addresses
        self.networks = networks
        self.announce_seconds = announce_seconds
        self.instance = f"ctxfs-{node.node_id[:INSTANCE_ID_DIGITS]}"
        self.name = f"{self.instance}.{SERVICE_TYPE}"
        self.token = trio.lowlevel.current_trio_token()
        self.send, self.receive = trio.open_memory_channel(EVENT_QUEUE)
        self.overflowed = False
        self.root_dirty = trio.Event()
        self.published_root: str | None = None
        # Service name -> what it said last (other nodes only).
        self.services: dict[str, Sighting] = {}
        self.seen_self = False  # our own advert came back: mDNS works here
        self.updates = 0  # TXT updates published
        self.nursery: trio.Nursery | None = None  # for deferred dials; set by run_discovery
        self._deferred: set[str] = set()  # services whose dial waits out DIAL_GRACE_SECONDS
        self._loop_info: ServiceInfo | None = None
        self._loop_browser: AsyncServiceBrowser | None = None
        self._loop_broadcast: asyncio.Future | None = None
        self._loop_resolving: dict[str, asyncio.Task] = {}

    # ------------------------------------------------------------ our record

    def _make_info(self, root: str) -> ServiceInfo:
        properties = {"id": self.node.node_id, "v": str(max(PROTOCOL_VERSIONS)), "root": root}
        return ServiceInfo(
            SERVICE_TYPE, self.name, port=self.port, properties=properties,
            server=f"{self.instance}.local.", parsed_addresses=self.addresses,
        )

    async def _loop_register(self, root: str) -> None:
        self._loop_info = self._make_info(root)
        self._loop_broadcast = await self.zc.async_register_service(self._loop_info, cooperating_responders=True)

    async def _loop_start_browser(self) -> None:
        # Made here, on zeroconf's loop: made on another thread it sends no queries.
        self._loop_browser = AsyncServiceBrowser(self.zc, SERVICE_TYPE, handlers=[self._loop_handler])

    async def _loop_update(self, root: str) -> None:
        if self._loop_broadcast is not None:
            self._loop_broadcast.cancel()  # an older TXT must not go out after the new one
        self._loop_info = self._make_info(root)
        self._loop_broadcast = await self.zc.async_update_service(self._loop_info)

    async def _loop_announce(self, rescan: bool) -> None:
        if self._loop_info is not None:
            self.zc.async_send(self.zc.generate_service_broadcast(self._loop_info, None))
        if rescan:
            for record in self.zc.cache.async_all_by_details(SERVICE_TYPE, _TYPE_PTR, _CLASS_IN):
                self._loop_handler(self.zc, SERVICE_TYPE, record.alias, ServiceStateChange.Updated)

    async def _loop_stop(self) -> None:
        if self._loop_browser is not None:
            await self._loop_browser.async_cancel()
        for task in list(self._loop_resolving.values()):
            task.cancel()
        if self._loop_broadcast is not None:
            self._loop_broadcast.cancel()
        await self.zc.async_unregister_all_services()  # goodbye packets

    # ------------------------------------------------------------ browsing (zeroconf's loop)

    def _loop_handler(self, zeroconf: Zeroconf, service_type: str, name: str,
                      state_change: ServiceStateChange) -> None:
        """The browser's callback: never blocks."""
        if state_change is ServiceStateChange.Removed:
            self._post(("removed", name))
            return
        info = AsyncServiceInfo(service_type, name)
        if info.load_from_cache(zeroconf):
            self._post(self._sighting(name, info))
        elif name not in self._loop_resolving and len(self._loop_resolving) < MAX_RESOLVING:
            task = asyncio.ensure_future(self._loop_resolve(zeroconf, name, info))
            self._loop_resolving[name] = task
            task.add_done_callback(lambda _t, name=name: self._loop_resolving.pop(name, None))

    async def _loop_resolve(self, zeroconf: Zeroconf, name: str, info: AsyncServiceInfo) -> None:
        try:
            if await info.async_request(zeroconf, RESOLVE_TIMEOUT_MS):
                self._post(self._sighting(name, info))
        except Exception as exc:  # noqa: BLE001 — a bad record must not end the browser
            log.debug("resolving %s: %r", name, exc)

    @staticmethod
    def _sighting(name: str, info: ServiceInfo) -> tuple:
        try:
            txt = info.decoded_properties
        except Exception:  # noqa: BLE001 — undecodable TXT: treat as empty
            txt = {}
        return ("seen", name, dict(txt), tuple(info.parsed_scoped_addresses()), info.port)

    def _post(self, item: tuple) -> None:
        """From zeroconf's loop to trio, without waiting for trio."""
        try:
            self.token.run_sync_soon(self._deliver, item)
        except trio.RunFinishedError:
            pass

    def _deliver(self, item: tuple) -> None:
        # Runs as a trio run_sync_soon callback: it must never raise.
        try:
            self.send.send_nowait(item)
        except trio.WouldBlock:
            self.overflowed = True  # the next announce tick rescans the cache
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass

    # ------------------------------------------------------------ trio tasks

    async def consume(self) -> None:
        async with self.receive:
            async for item in self.receive:
                if item[0] == "removed":
                    self.services.pop(item[1], None)
                else:
                    self._seen(*item[1:])

    def _seen(self, name: str, txt: dict, addresses: tuple[str, ...], port: Any) -> None:
        node_id = txt.get("id")
        if node_id == self.node.node_id or name == self.name:
            self.seen_self = True
            return
        if not _is_node_id(node_id) or not isinstance(port, int) or not 0 < port < 65536:
            _errors.warning("bad", "mDNS: ignoring %s: no valid node id and port in its record", name)
            return
        address = best_address(addresses, self.networks)
        if address is None:
            return  # no address yet (records still arriving): a later event brings it
        if name not in self.services and len(self.services) >= MAX_SERVICES:
            _errors.warning("full", "mDNS: more than %d services seen; ignoring %s", MAX_SERVICES, name)
            return
        previous = self.services.get(name)
        sighting = self.services[name] = Sighting(node_id, address, port, txt)
        if previous is None or previous.peer != sighting.peer:
            log.info("mDNS: found node %s at %s", node_id[:12], format_address(address, port))
        if self.node.node_id < node_id or self.nursery is None:
            self.node.discovered(*sighting.peer)
        elif name not in self._deferred:
            self._deferred.add(name)
            self.nursery.start_soon(self._propose_later, name)

    async def _propose_later(self, name: str) -> None:
        try:
            await trio.sleep(DIAL_GRACE_SECONDS)
        finally:
            self._deferred.discard(name)
        sighting = self.services.get(name)
        if sighting is not None:
            self.node.discovered(*sighting.peer)  # no-op if the peer has connected to us

    def on_root_changed(self) -> None:
        """node.watch callback: synchronous, never blocks."""
        self.root_dirty.set()

    async def publish_root(self) -> None:
        """Keep the TXT `root` current, at most one update per TXT_UPDATE_MIN_SECONDS."""
        while True:
            await self.root_dirty.wait()
            self.root_dirty = trio.Event()
            root = self.node.root().hex()
            if root != self.published_root:
                try:
                    await _on_loop(self.zc, self._loop_update, root)
                    self.published_root = root
                    self.updates += 1
                except _LOOP_ERRORS as exc:
                    _errors.warning("update", "mDNS: cannot update our record: %r", exc)
                    self.root_dirty.set()  # try again after the pause
            await trio.sleep(TXT_UPDATE_MIN_SECONDS)

    async def announce(self) -> None:
        """Re-announce now and then; re-propose every known peer (a session
        that was inbound when the peer was first seen may be gone now)."""
        while True:
            await trio.sleep(self.announce_seconds * random.uniform(0.9, 1.1))
            rescan, self.overflowed = self.overflowed, False
            try:
                await _on_loop(self.zc, self._loop_announce, rescan)
            except _LOOP_ERRORS as exc:
                _errors.warning("announce", "mDNS: cannot re-announce: %r", exc)
            for sighting in list(self.services.values()):
                self.node.discovered(*sighting.peer)

    async def stop(self) -> None:
        """Goodbyes on zeroconf's loop, then its blocking close in a worker thread; shielded, bounded."""
        with trio.move_on_after(STOP_BOUND) as scope:
            scope.shield = True
            try:
                await _on_loop(self.zc, self._loop_stop)
            except Exception as exc:  # noqa: BLE001 — closing anyway
                log.debug("mDNS: unregistering: %r", exc)
        with trio.move_on_after(STOP_BOUND) as scope:
            scope.shield = True
            # zeroconf joins its loop thread; a close that hangs is left
            # behind (its threads are daemon threads) rather than hang us.
            await trio.to_thread.run_sync(self.zc.close, abandon_on_cancel=True)
        if scope.cancelled_caught:
            _errors.warning("close", "mDNS: zeroconf did not close within %.0f s; left behind", STOP_BOUND)
        self.send.close()


# --------------------------------------------------------------------------
# the task
# --------------------------------------------------------------------------


async def run_discovery(node: Any, *, interfaces: Sequence[str] = (),
                        announce_seconds: float = DEFAULT_ANNOUNCE_SECONDS,
                        task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Advertise `node` over mDNS and propose every other node seen, until cancelled.

    Call after the node's listener is bound (`node.listen_address` set).
    `interfaces`: addresses of the interfaces to use (default: the listen
    address if it is a specific one, else every IPv4 interface). If mDNS
    cannot start, logs one warning and returns: static peers keep working.
    `task_status.started(handle)` is called once registration and browsing
    run, with the `Discovery` (what it has seen, for status and tests); or
    `started(None)` once discovery has given up.
    """
    host, port = node.listen_address
    choice, ip_version = mdns_interfaces(host, interfaces)
    where = ", ".join(choice) if isinstance(choice, list) else "all IPv4 interfaces"
    try:
        addresses = advertised_addresses(host, interfaces)
        local = _local_networks()
    except (OSError, ValueError) as exc:
        log.warning("mDNS discovery off: cannot list network interfaces: %s; static peers still work", exc)
        task_status.started(None)
        return
    if isinstance(choice, list):
        chosen = {c.split("%", 1)[0] for c in choice}
        networks = [net for address, net in local if address in chosen] or [net for _, net in local]
    else:
        networks = [net for _, net in local]
    if not addresses:
        log.warning("mDNS discovery off: no address to advertise on %s; static peers still work", where)
        task_status.started(None)
        return
    try:
        zc = await trio.to_thread.run_sync(
            functools.partial(Zeroconf, interfaces=choice, ip_version=ip_version, use_asyncio=False)
        )
    except (OSError, ValueError, RuntimeError) as exc:
        log.warning("mDNS discovery off: cannot open mDNS sockets on %s: %s; static peers still work",
                    where, getattr(exc, "strerror", None) or exc)
        task_status.started(None)
        return
    discovery = Discovery(node, zc, port=port, addresses=addresses, networks=networks,
                          announce_seconds=announce_seconds)
    unwatch = node.watch(discovery.on_root_changed)
    try:
        try:
            discovery.published_root = node.root().hex()
            await _on_loop(zc, discovery._loop_register, discovery.published_root)
            await _on_loop(zc, discovery._loop_start_browser)
        except (*_LOOP_ERRORS, ValueError, ZeroconfError) as exc:
            log.warning("mDNS discovery off: cannot register on %s: %r; static peers still work", where, exc)
            task_status.started(None)
            return
        log.info("mDNS: advertising %s as %s on %s", discovery.instance,
                 ", ".join(format_address(a, port) for a in addresses), where)
        async with trio.open_nursery() as nursery:
            discovery.nursery = nursery
            nursery.start_soon(discovery.consume)
            nursery.start_soon(discovery.publish_root)
            nursery.start_soon(discovery.announce)
            # The root may have moved while we registered.
            discovery.root_dirty.set()
            task_status.started(discovery)
    finally:
        unwatch()
        await discovery.stop()
