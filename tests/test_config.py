"""Tests for daemon.config: addresses a user types are read as meant, or refused by name."""

from __future__ import annotations

import pytest

from daemon.config import DEFAULT_PORT, ConfigError, listen_scope, load_config, parse_address


@pytest.mark.parametrize(
    "text, expected",
    [
        ("10.0.0.2:7787", ("10.0.0.2", 7787)),
        ("10.0.0.2", ("10.0.0.2", DEFAULT_PORT)),
        ("lab-host-3:17702", ("lab-host-3", 17702)),
        ("lab-host-3", ("lab-host-3", DEFAULT_PORT)),
        ("[fe80::1]:7787", ("fe80::1", 7787)),
        ("[::1]", ("::1", DEFAULT_PORT)),
    ],
)
def test_peer_addresses_that_mean_one_thing(text, expected):
    assert parse_address(text, "peer", default_port=DEFAULT_PORT) == expected


@pytest.mark.parametrize(
    "text, needles",
    [
        # The host forgotten: the resolver would read 17702 as 0.0.69.38.
        ("17702", ["'17702' is a port without a host", "HOST:PORT", ":17702"]),
        (" 7787 ", ["is a port without a host"]),
        ("10.0.0:7787", ["'10.0.0' is not an IPv4 address"]),
        ("1.2.3.4.5", ["is not an IPv4 address"]),
        ("300.1.1.1:7787", ["is not an IPv4 address"]),
        ("fe80::1:7787", ["needs brackets", "[fe80::1]:7787"]),
        ("10.0.0.2:0", ["port 0 cannot be dialled"]),
        ("10.0.0.2:http", ["port must be a number", "'http'"]),
        ("10.0.0.2:70000", ["port 70000 is out of range"]),
        (":7787", ["expected HOST:PORT"]),
    ],
)
def test_peer_addresses_that_are_mistakes_are_refused_by_name(text, needles):
    with pytest.raises(ConfigError) as info:
        parse_address(text, "peer", default_port=DEFAULT_PORT)
    message = str(info.value)
    assert message.startswith("peer: ") and "\n" not in message
    for needle in needles:
        assert needle in message, (needle, message)


def test_listen_takes_port_0_and_refuses_a_bare_port_with_an_example():
    assert parse_address("127.0.0.1:0", "listen", default_port=DEFAULT_PORT) == ("127.0.0.1", 0)
    with pytest.raises(ConfigError, match=r"listen: '7787' is a port without a host; .* 0\.0\.0\.0:7787"):
        parse_address("7787", "listen", default_port=DEFAULT_PORT)


def test_a_bare_port_in_config_toml_is_refused_too(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text('peers = ["10.0.0.2:7787", "17702"]\n')
    with pytest.raises(ConfigError, match="'17702' is a port without a host"):
        load_config(config, {})
    config.write_text('peers = ["10.0.0.2:7787", "lab-host-3"]\n')
    assert load_config(config, {}).peers == (("10.0.0.2", 7787), ("lab-host-3", DEFAULT_PORT))


def test_the_listen_scope_says_who_can_connect():
    assert listen_scope("0.0.0.0").startswith("every interface: other hosts can connect; TLS admits only members")
    assert listen_scope("::").startswith("every interface")
    assert listen_scope("127.0.0.1") == listen_scope("::1") == "loopback: this machine only"
    assert listen_scope("192.168.1.20") == "that interface only"
