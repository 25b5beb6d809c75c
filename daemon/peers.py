"""The node's peers: who it knows, whom it dials, and the status rows of both.

`PeerTable` is the part of `Node` (daemon/node.py) that keeps
`self.peers` (one `PeerInfo` per address, or per node id for a peer that
dialled in), runs one dial loop per static or discovered address, and
chooses which known peers to dial at all: at most `max_peers`, by the
overlay rule of sync/overlay.py. It uses the node's `config`,
`node_id(_bytes)`, `sessions`, `_nursery` and `_client_tls`.
"""

from __future__ import annotations

import logging
import random
from datetime import datetime, timezone

import attrs
import trio

from daemon import neterrors
from daemon.config import ConfigError, format_address, parse_address
from daemon.logs import RateLimitedLog
from sync import overlay

log = logging.getLogger(__name__)
_refusals = RateLimitedLog(log)
# Peers we cannot reach: the first failure is logged at once, then one line
# per peer this often while it stays away (a reconnect every 30 s would
# otherwise write ~3000 lines a day per absent peer).
_unreachable = RateLimitedLog(log, interval=600.0)

# Rows kept in status for inbound peers whose session ended (with their last
# error), most recent last; older ones are forgotten. Static and discovered
# peers keep their row while they are dialled (see below).
MAX_DISCONNECTED_INBOUND = 16
# A peer that dialled us or that mDNS found, not connected for this long,
# leaves status (and an mDNS one is no longer dialled; discovery proposes it
# again while it still advertises). An hour keeps in view who left and why
# across a reboot or a meeting, and drops a laptop gone for the day; a peer
# that left has long since been dialled at the backoff's cap (30 s) for
# nothing. Static peers are configuration: they stay until `peer forget`.
FORGET_ABSENT_PEERS_SECONDS = 3600.0


def _state_changed(info: PeerInfo, _attribute: attrs.Attribute, state: str) -> str:
    # Every change of state is timed here, wherever a session makes it.
    if state == "connected":
        info.goodbye = None
        info.disconnected_at = None
    elif info.state == "connected":
        info.disconnected_at = datetime.now(timezone.utc)
        info.absent_since = trio.current_time()
    return state


# Dials in a row that fail before a chosen peer counts as gone: the overlay
# chooses another in its place (and keeps probing it, with backoff). Two,
# so one refused dial during a peer's restart does not move links.
UNREACHABLE_AFTER = 2


@attrs.define
class PeerInfo:
    """What `status` shows about one peer; updated by its session."""

    address: str
    source: str  # "static" | "mdns" | "inbound"
    node_id: str | None = None
    state: str = attrs.field(default="connecting", on_setattr=_state_changed)  # "connected" | "connecting" | "disconnected" | "known" (not chosen)
    root: bytes | None = None
    last_sync: datetime | None = None
    objects_sent: int = 0
    objects_received: int = 0
    error: str | None = None
    failed_dials: int = 0  # dials in a row that did not connect
    # The reason the peer gave in the GOODBYE that ended its last session
    # (it left on purpose: stopped, or was told to); None if that session
    # ended otherwise, or the peer is connected.
    goodbye: str | None = None
    # When the last session ended (for status); None while connected or
    # before the first session.
    disconnected_at: datetime | None = None
    # Where the peer accepts connections: the dialled address for static and
    # mDNS peers; for an inbound one what its certificate says, if it says.
    listen: str | None = None
    # trio time since when the peer has not been connected: when its last
    # session ended, else when it was first proposed (FORGET_ABSENT_PEERS_SECONDS).
    absent_since: float = attrs.field(factory=trio.current_time)


@attrs.frozen(kw_only=True)
class _Dialler:
    scope: trio.CancelScope
    info: PeerInfo


class PeerTable:
    """Peers known and dialled; a base of Node (see the module docstring)."""

    def __init__(self) -> None:
        self.peers: dict[str, PeerInfo] = {}  # by address, or by node id for inbound
        self._dialing: set[str] = set()  # addresses a dial loop runs for
        # The overlay (sync/overlay.py): node ids this node dials now, and an
        # event set (then replaced) whenever that choice changes.
        self._chosen: frozenset[str] = frozenset()
        self._choice_changed = trio.Event()
        self._diallers: dict[str, _Dialler] = {}  # by address: how to stop a dial loop

    def _forget_absent(self) -> None:
        """Drop the rows of peers absent for FORGET_ABSENT_PEERS_SECONDS (static ones stay)."""
        cutoff = trio.current_time() - FORGET_ABSENT_PEERS_SECONDS
        # A peer is absent since the latest end of any of its rows' sessions.
        since: dict[str, float] = {}
        for info in self.peers.values():
            if info.node_id is not None:
                since[info.node_id] = max(since.get(info.node_id, info.absent_since), info.absent_since)
        absent = [
            key for key, info in self.peers.items()
            if info.source != "static" and info.state != "connected"
            and info.node_id not in self.sessions  # connected the other way
            and since.get(info.node_id, info.absent_since) < cutoff
        ]
        for key in absent:
            self._drop_peer(key)

    def _drop_peer(self, key: str) -> PeerInfo:
        info = self.peers.pop(key)
        dialler = self._diallers.get(key)
        if dialler is not None and dialler.info is info:
            dialler.scope.cancel()
        self.choose_peers()  # one fewer to choose from
        return info

    def forget_peer(self, text: str) -> list[dict]:
        """Drop the rows of the peers `text` names and stop dialling them:
        a node id or a unique prefix of one (4+ hex digits), or an address
        as status shows it. Returns [{node_id, address}] of what was dropped.

        LookupError if no peer matches; ValueError if one of them is
        connected (its row would be back at once) or a prefix names several.
        A static peer is dialled again when the daemon next starts.
        """
        text = text.strip()
        if len(text) >= 4 and all(c in "0123456789abcdef" for c in text.lower()):
            prefix = text.lower()
            keys = [k for k, i in self.peers.items() if i.node_id is not None and i.node_id.startswith(prefix)]
            named = sorted({self.peers[k].node_id for k in keys})
            if len(named) > 1:
                raise ValueError(f"{len(named)} peers have ids starting with {text}: "
                                 f"{', '.join(n[:12] for n in named[:5])}; give more digits")
        else:
            try:
                wanted = {text, format_address(*parse_address(text, "peer"))}
            except ConfigError:
                wanted = {text}
            keys = [k for k, i in self.peers.items() if i.address in wanted or i.listen in wanted]
        if not keys:
            raise LookupError(f"no peer matches {text!r} (`ctxfs status` lists them)")
        for key in keys:
            node_id = self.peers[key].node_id
            if node_id is not None and node_id in self.sessions:
                raise ValueError(f"peer {node_id[:12]} is connected; only a peer that is not can be forgotten")
        return [{"node_id": info.node_id, "address": info.address} for info in map(self._drop_peer, keys)]

    def _forget_old_inbound(self) -> None:
        ended = [key for key, info in self.peers.items() if info.source == "inbound" and info.state != "connected"]
        for key in ended[:-MAX_DISCONNECTED_INBOUND]:
            del self.peers[key]

    def discovered(self, node_id: str, address: tuple[str, int], source: str = "mdns") -> None:
        """Discovery proposes a peer; it is known from now on, and dialled
        while the overlay chooses it (choose_peers).

        Proposals are only addresses: TLS decides who gets in, and the
        one-connection-per-pair rule settles a peer dialled both ways.
        Never blocks; safe to call from the discovery task on every event.
        """
        if node_id == self.node_id or self._nursery is None:
            return
        key = format_address(*address)
        if key in self._dialing:
            known = self.peers.get(key)
            if known is not None and known.state == "known":
                known.absent_since = trio.current_time()  # still advertised: not gone
            return
        self._dialing.add(key)
        info = self.peers.setdefault(key, PeerInfo(address=key, source=source, node_id=node_id, listen=key))
        self.choose_peers()
        self._nursery.start_soon(self._dial_forever, address, source, info)

    # ------------------------------------------------------------ the overlay

    def choose_peers(self) -> None:
        """Choose again which known peers to dial (sync/overlay.py): at most
        max_peers; static peers always, if they fit. Wakes the dial loops
        and ends the sessions we dialled to peers no longer chosen (the
        peer may still dial us: its choice is its own)."""
        own = self.node_id_bytes
        # Unreachable peers are left out until a dial reaches them again;
        # a peer dialling us is reachable whatever our dials say.
        known = {bytes.fromhex(i.node_id) for i in self.peers.values()
                 if i.source != "inbound" and i.node_id is not None
                 and (i.failed_dials < UNREACHABLE_AFTER or i.node_id in self.sessions)} - {own}
        static = {bytes.fromhex(i.node_id) for i in self.peers.values()
                  if i.source == "static" and i.node_id is not None} & known
        limit = self.config.max_peers
        if len(static) <= limit:
            chosen = static | set(overlay.choose_links(own, known - static, limit - len(static)))
        else:
            chosen = set(overlay.choose_links(own, known, limit))
        choice = frozenset(c.hex() for c in chosen)
        if choice != self._chosen:
            self._chosen = choice
            self._choice_changed.set()
            self._choice_changed = trio.Event()
        # Also when the choice stays: a static peer just identified may not be in it.
        for info in list(self.peers.values()):
            session = self.sessions.get(info.node_id) if info.node_id else None
            if (info.source != "inbound" and info.node_id not in choice and session is not None
                    and session.info is info):
                session.retire("not among this node's chosen peers")

    def _wanted(self, info: PeerInfo) -> bool:
        """Dial this peer now? Yes if the overlay chose it; to learn who a
        static address is (its id comes with its HELLO); and, with backoff,
        to notice that an unreachable peer is back."""
        return info.node_id is None or info.node_id in self._chosen or info.failed_dials >= UNREACHABLE_AFTER

    async def _dial_forever(self, address: tuple[str, int], source: str, proposed: PeerInfo | None = None) -> None:
        """Keep one connection to a static or discovered peer, reconnecting
        with capped backoff, until the peer is forgotten."""
        key = format_address(*address)
        if proposed is not None and self.peers.get(key) is not proposed:
            self._dialing.discard(key)  # forgotten before this task began
            return
        info = self.peers.setdefault(key, PeerInfo(address=key, source=source, listen=key))
        # Forgetting the peer (its row dropped) ends this loop.
        with trio.CancelScope() as scope:
            self._diallers[key] = _Dialler(scope=scope, info=info)
            try:
                await self._dial(address, info)
            finally:
                if self._diallers.get(key) is not None and self._diallers[key].scope is scope:
                    del self._diallers[key]
                    self._dialing.discard(key)

    async def _dial(self, address: tuple[str, int], info: PeerInfo) -> None:
        from daemon.peer import run_session

        from daemon import tls

        key = info.address
        delay = self.config.reconnect_min_seconds
        while True:
            if not self._wanted(info):
                # Known, not chosen: wait for the overlay to change its mind.
                info.state, info.error = "known", None
                await self._choice_changed.wait()
                delay = self.config.reconnect_min_seconds
                continue
            info.state = "connecting"
            connected = False
            tcp_done = False
            try:
                with trio.fail_after(self.config.hello_timeout_seconds):
                    stream = await trio.open_tcp_stream(*address)
                    tcp_done = True
                    stream = await tls.wrap_client(stream, self._client_tls)
                connected = True
                info.failed_dials = 0
                _unreachable.forget(key)  # a later outage is reported at once
                await run_session(self, stream, info, dialer=True)
            except tls.NotAMember as exc:
                info.error = exc.message
                _refusals.warning(key, "peer %s: %s", key, exc.message)
            except (OSError, trio.TooSlowError, trio.BrokenResourceError) as exc:
                why = neterrors.reason(exc)
                if isinstance(exc, trio.TooSlowError):
                    why = f"no answer within {self.config.hello_timeout_seconds:g} s"
                info.error = f"cannot connect: {why}" if not tcp_done else f"TLS handshake failed: {why}"
                info.failed_dials += 1
                log.debug("peer %s (%s): %s", key, info.source, info.error)
                # A peer that never answers must show in the log, not only in
                # status; once, then now and then while it stays away.
                _unreachable.warning(key, "peer %s (%s): %s; still trying (%d failed attempt%s so far)",
                                     key, info.source, info.error, info.failed_dials,
                                     "" if info.failed_dials == 1 else "s")
                if info.failed_dials == UNREACHABLE_AFTER:
                    self.choose_peers()  # chosen but gone: another takes its place
            # Lost the one-connection-per-pair rule: the peer's own dial is
            # the connection. Redial only once that one is gone.
            while info.node_id is not None and info.node_id in self.sessions:
                await trio.sleep(1.0)
            info.state = "disconnected"
            if connected and info.error is None:
                delay = self.config.reconnect_min_seconds
            await trio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, self.config.reconnect_max_seconds)
