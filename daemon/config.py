"""Node settings: defaults, then `config.toml` in the home, then the command line."""

from __future__ import annotations

import tomllib
from pathlib import Path

import attrs

DEFAULT_PORT = 7787


class ConfigError(Exception):
    """A bad setting; the message is one line naming it."""


def parse_address(text: str, what: str, *, default_port: int | None = None) -> tuple[str, int]:
    """HOST:PORT (or [v6]:PORT) -> (host, port).

    A bare number is refused rather than taken for a host: `--peer 17702`
    is a forgotten host, and the resolver would read it as the IPv4
    address 0.0.69.38 and dial that.
    """
    if text.startswith("[") and text.endswith("]"):
        host, sep, port = text, "", ""  # [v6] alone
    else:
        host, sep, port = text.rpartition(":")
    if not sep:
        if default_port is None:
            raise ConfigError(f"{what}: expected HOST:PORT, got {text!r}")
        if text.strip().isdigit():
            example = "0.0.0.0" if what == "listen" else "192.168.1.20"
            raise ConfigError(f"{what}: {text!r} is a port without a host; expected HOST:PORT, e.g. {example}:{text.strip()}")
        host, port = text, str(default_port)
    bracketed = host.startswith("[") and host.endswith("]")
    host = host.strip("[]")
    if not host:
        raise ConfigError(f"{what}: expected HOST:PORT, got {text!r}")
    if ":" in host and not bracketed:
        raise ConfigError(f"{what}: an IPv6 address needs brackets, e.g. [{host}]:{port}; got {text!r}")
    if all(c.isdigit() or c == "." for c in host) and not _is_ipv4(host):
        # The resolver reads "10.0.0" or "1234" as some address; a typo must not be dialled.
        raise ConfigError(f"{what}: {host!r} is not an IPv4 address (four numbers 0-255, e.g. 10.0.0.2)")
    try:
        number = int(port)
    except ValueError:
        raise ConfigError(f"{what}: port must be a number, got {port!r}") from None
    if not 0 <= number <= 65535:
        raise ConfigError(f"{what}: port {number} is out of range")
    if number == 0 and what != "listen":
        raise ConfigError(f"{what}: port 0 cannot be dialled; give the port the peer listens on")
    return host, number


def _is_ipv4(text: str) -> bool:
    import ipaddress

    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return True


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def listen_scope(host: str) -> str:
    """Who can reach a listener on `host`, in words, for the log line that says where the node listens."""
    import ipaddress

    if host in ("", "0.0.0.0", "::"):
        return "every interface: other hosts can connect; TLS admits only members of this cluster"
    try:
        if ipaddress.ip_address(host).is_loopback:
            return "loopback: this machine only"
    except ValueError:
        return "the interfaces that name resolves to"
    return "that interface only"


@attrs.frozen(kw_only=True)
class NodeConfig:
    listen: tuple[str, int] = ("0.0.0.0", DEFAULT_PORT)
    peers: tuple[tuple[str, int], ...] = ()
    mdns: bool = True
    # mDNS (daemon/discovery.py): addresses of the interfaces to advertise and
    # browse on (default: the listen address if specific, else every IPv4
    # interface), and how often to re-announce (a host that missed our first
    # announcement learns of us only then).
    mdns_interfaces: tuple[str, ...] = ()
    mdns_announce_seconds: float = 10.0
    # A full reconciliation with every peer this often, even if no root
    # announcement was missed: the safety net under announce-driven sync.
    anti_entropy_seconds: float = 30.0
    # PING an idle link this often; a peer silent for idle_timeout is dropped.
    ping_seconds: float = 10.0
    idle_timeout_seconds: float = 30.0
    # A peer must finish HELLO within this; a stalled dialer holds nothing long.
    hello_timeout_seconds: float = 10.0
    # Reconnect backoff for static peers: doubling from min to max, jittered.
    reconnect_min_seconds: float = 0.5
    reconnect_max_seconds: float = 30.0
    # Inbound member sessions at once (counted once TLS has proved a member;
    # handshakes have their own bounds in daemon/node.py); more are told
    # LIMIT_EXCEEDED and closed. Each may pin our receive window plus
    # sync.connection.MAX_CONTROL_BUFFERED (~36 MiB), so this bounds what
    # members can make us hold. 64 covers a 64-host lab dialling all to all.
    max_inbound_peers: int = 64
    # Local API clients at once; more are told LIMIT_EXCEEDED and closed.
    max_local_clients: int = 64
    # Peers this node dials at most (the overlay, sync/overlay.py): static
    # peers always if they fit, then the overlay's choice among the known.
    # Others dial us by their own choice, so a node has about twice this
    # many sessions whatever the cluster's size. 8: a cluster of up to 9
    # nodes is a full mesh; at 256 nodes the overlay's diameter is 4 hops.
    max_peers: int = 8
    log_json: bool = False


_FILE_KEYS = {
    "listen": str, "peers": list, "mdns": bool, "anti_entropy_seconds": (int, float),
    "ping_seconds": (int, float), "idle_timeout_seconds": (int, float),
    "hello_timeout_seconds": (int, float), "log_json": bool,
    "mdns_interfaces": list, "mdns_announce_seconds": (int, float),  # discovery
    "max_inbound_peers": int, "max_local_clients": int, "max_peers": int,
}


def load_config(path: Path, overrides: dict) -> NodeConfig:
    """Defaults < config.toml < command line (`overrides`, None = not given)."""
    values: dict = {}
    if path.exists():
        try:
            data = tomllib.loads(path.read_text("utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{path}: {exc}") from None
        for key, value in data.items():
            kinds = _FILE_KEYS.get(key)
            if kinds is None:
                raise ConfigError(f"{path}: unknown setting {key!r}")
            if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in _as_tuple(kinds)):
                raise ConfigError(f"{path}: {key} has the wrong type")
            values[key] = value
    values.update({k: v for k, v in overrides.items() if v is not None})
    if "listen" in values:
        values["listen"] = parse_address(values["listen"], "listen", default_port=DEFAULT_PORT)
    if "peers" in values:
        values["peers"] = tuple(parse_address(p, "peer", default_port=DEFAULT_PORT) for p in values["peers"])
    if "mdns_interfaces" in values:  # discovery: interface addresses, e.g. 10.0.0.5
        values["mdns_interfaces"] = tuple(_interface_address(a) for a in values["mdns_interfaces"])
    for key in ("anti_entropy_seconds", "ping_seconds", "idle_timeout_seconds", "hello_timeout_seconds",
                "mdns_announce_seconds"):
        if key in values and not values[key] > 0:
            raise ConfigError(f"{key} must be positive")
    for key in ("max_inbound_peers", "max_local_clients", "max_peers"):
        if key in values and not (isinstance(values[key], int) and values[key] >= 1):
            raise ConfigError(f"{key} must be a whole number of at least 1")
    return NodeConfig(**values)


def _interface_address(text: object) -> str:
    """An mDNS interface is named by one of its IP addresses."""
    import ipaddress

    try:
        return str(ipaddress.ip_address(str(text).strip()))
    except ValueError:
        raise ConfigError(f"mdns interface: expected an IP address, got {text!r}") from None


def _as_tuple(kinds):
    return kinds if isinstance(kinds, tuple) else (kinds,)
