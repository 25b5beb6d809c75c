"""Tests for sync.flow: windows, the grant rule, and a sender/receiver simulation."""

from __future__ import annotations

from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sync import frames
from sync.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from sync.flow import (
    DEFAULT_CONNECTION_WINDOW,
    DEFAULT_STREAM_WINDOW,
    MAX_WINDOW,
    FlowController,
    FlowStatistics,
    Grant,
    ReceiveWindow,
    SendWindow,
)


def test_defaults_fit_together():
    # A flow-controlled message must fit one stream window to be deliverable,
    # and reassembly must hold a full connection window plus a control message.
    assert frames.DEFAULT_MAX_MESSAGE_SIZE <= DEFAULT_STREAM_WINDOW <= DEFAULT_CONNECTION_WINDOW
    assert frames.DEFAULT_MAX_REASSEMBLY_SIZE >= (
        DEFAULT_CONNECTION_WINDOW + frames.DEFAULT_MAX_MESSAGE_SIZE
    )
    assert DEFAULT_CONNECTION_WINDOW <= MAX_WINDOW


# --- SendWindow -------------------------------------------------------------------


def test_send_window_never_sends_more_than_granted():
    window = SendWindow(100)
    window.consume(60)
    with pytest.raises(LocalProtocolError) as info:
        window.consume(41)
    assert info.value.code == ErrorCode.FLOW_CONTROL
    assert window.available == 40 and window.unacknowledged == 60
    window.consume(40)
    window.grant(25)
    assert window.available == 25 and window.unacknowledged == 75


def test_send_window_rejects_bad_credit():
    window = SendWindow(MAX_WINDOW - 10)
    for bad in (0, -1, 11):
        with pytest.raises(RemoteProtocolError) as info:
            window.grant(bad)
        assert info.value.code == ErrorCode.FLOW_CONTROL
    window.grant(10)
    assert window.available == MAX_WINDOW


# --- ReceiveWindow and the grant rule ---------------------------------------------------


def test_peer_exceeding_the_window_is_remote_error():
    window = ReceiveWindow(100)
    window.on_data(100)
    with pytest.raises(RemoteProtocolError) as info:
        window.on_data(1)
    assert info.value.code == ErrorCode.FLOW_CONTROL
    assert window.unreleased == 100


def test_releasing_more_than_received_is_local_error():
    window = ReceiveWindow(100)
    window.on_data(10)
    with pytest.raises(LocalProtocolError):
        window.release(11)


def test_grants_are_batched_to_half_the_window():
    window = ReceiveWindow(100)
    window.on_data(80)
    for _ in range(4):
        window.release(10)
        assert window.take_grant() == 0  # 40 pending: below half, peer not blocked
    window.release(10)
    assert window.take_grant() == 50
    assert window.available == 70 and window.pending == 0


def test_idle_receiver_restores_the_full_window():
    window = ReceiveWindow(100)
    window.on_data(30)
    window.release(20)
    assert window.pending_grant() == 0
    window.release(10)  # everything received is now stored
    assert window.take_grant() == 30
    assert window.available == 100


def test_blocked_peer_gets_even_a_small_grant():
    window = ReceiveWindow(100)
    window.on_data(100)
    window.release(1)
    assert window.take_grant() == 1


# --- FlowController --------------------------------------------------------------------


def controller(**kwargs) -> FlowController:
    kwargs = {
        "send_connection_window": 100,
        "send_stream_window": 60,
        "receive_connection_window": 100,
        "receive_stream_window": 60,
    } | kwargs
    flow = FlowController(**kwargs)
    for stream_id in (1, 3):
        flow.open_stream(stream_id)
    return flow


def test_send_needs_both_windows():
    flow = controller()
    assert flow.send_capacity(1) == 60
    flow.consume(1, 60)
    with pytest.raises(LocalProtocolError):
        flow.consume(1, 1)  # stream window spent
    assert flow.send_capacity(3) == 40
    with pytest.raises(LocalProtocolError):
        flow.consume(3, 41)  # connection window spent; nothing changed
    assert flow.statistics().send_available == 40
    flow.on_credit(1, 10)
    assert flow.send_capacity(1) == 10
    flow.on_credit(0, 30)
    assert flow.send_capacity(3) == 60
    with pytest.raises(LocalProtocolError):
        flow.consume(5, 1)  # never opened


def test_peer_overrunning_stream_or_connection_is_remote_error():
    flow = controller()
    flow.on_data(1, 60)
    with pytest.raises(RemoteProtocolError):
        flow.on_data(1, 1)
    flow.on_data(3, 40)
    with pytest.raises(RemoteProtocolError):
        flow.on_data(3, 1)
    assert flow.statistics().receive_unreleased == 100


def test_take_grants_stream_first_then_connection():
    flow = controller()
    flow.on_data(1, 50)
    flow.on_data(3, 10)
    flow.release(1, 50)
    assert flow.take_grants() == [Grant(stream_id=1, amount=50), Grant(stream_id=0, amount=50)]
    assert flow.take_grants() == []
    flow.release(3, 10)
    assert flow.take_grants() == [Grant(stream_id=3, amount=10), Grant(stream_id=0, amount=10)]


def test_closed_stream_still_counts_on_the_connection():
    flow = controller()
    flow.on_data(1, 30)
    flow.close_stream(1)
    flow.on_credit(1, 5)  # late credit for a closed stream: ignored
    flow.on_data(1, 20)  # late data: charged to the connection only
    assert flow.statistics().receive_available == 50
    flow.release(1, 50)
    assert flow.take_grants() == [Grant(stream_id=0, amount=50)]
    assert flow.statistics() == FlowStatistics(
        open_streams=1,
        send_available=100,
        send_unacknowledged=0,
        receive_available=100,
        receive_unreleased=0,
        receive_pending_grant=0,
    )


def test_open_stream_twice_or_stream_zero_is_local_error():
    flow = controller()
    for stream_id in (0, 1):
        with pytest.raises(LocalProtocolError):
            flow.open_stream(stream_id)


# --- Simulation: a sender and a receiver over a lossless, ordered link --------------------


class Link:
    """Two FlowControllers, the messages to send, and the frames/credits in transit."""

    def __init__(self, conn_window, stream_window, messages, frame_size, streaming):
        windows = {
            "send_connection_window": conn_window,
            "send_stream_window": stream_window,
            "receive_connection_window": conn_window,
            "receive_stream_window": stream_window,
        }
        self.sender, self.receiver = FlowController(**windows), FlowController(**windows)
        self.windows = (conn_window, stream_window)
        self.frame_size, self.streaming = frame_size, streaming
        self.todo = {s: deque(sizes) for s, sizes in messages.items()}
        self.left = {s: None for s in messages}  # streaming: bytes left of the current message
        self.data: deque[tuple[int, int, bool]] = deque()  # (stream, size, last)
        self.credits: deque[Grant] = deque()
        self.partial = dict.fromkeys(messages, 0)
        self.releasable = dict.fromkeys(messages, 0)
        self.delivered = {s: [] for s in messages}
        self.sent = dict.fromkeys(messages, 0)
        self.released = dict.fromkeys(messages, 0)
        for s in messages:
            self.sender.open_stream(s)
            self.receiver.open_stream(s)

    def send(self, s) -> bool:
        if not self.todo[s]:
            return False
        capacity = self.sender.send_capacity(s)
        if self.streaming:  # fragments as credit allows
            if self.left[s] is None:
                self.left[s] = self.todo[s][0]
            n = min(self.frame_size, self.left[s], capacity)
            if n == 0 and self.left[s] > 0:
                return False
            self.sender.consume(s, n)
            self.left[s] -= n
            self.data.append((s, n, self.left[s] == 0))
            if self.left[s] == 0:
                self.todo[s].popleft()
                self.left[s] = None
        else:  # whole-message reservation
            size = self.todo[s][0]
            if size > capacity:
                return False
            self.sender.consume(s, self.todo[s].popleft())
            for start in range(0, max(size, 1), self.frame_size):
                n = min(self.frame_size, size - start)
                self.data.append((s, n, start + n == size))
        self.sent[s] += n if self.streaming else size
        return True

    def deliver(self) -> bool:
        if not self.data:
            return False
        s, n, last = self.data.popleft()
        self.receiver.on_data(s, n)  # a compliant sender never trips this
        self.partial[s] += n
        if last:
            self.delivered[s].append(self.partial[s])
            self.releasable[s] += self.partial[s]
            self.partial[s] = 0
        return True

    def release(self, s, n) -> None:
        self.receiver.release(s, n)
        self.releasable[s] -= n
        self.released[s] += n

    def grant(self) -> bool:
        grants = self.receiver.take_grants()
        self.credits.extend(grants)
        return bool(grants)

    def credit(self) -> bool:
        if not self.credits:
            return False
        grant = self.credits.popleft()
        self.sender.on_credit(grant.stream_id, grant.amount)
        return True

    def check_invariants(self) -> None:
        conn_window, stream_window = self.windows
        for s in self.sent:  # in flight = sent, not yet durably stored
            assert 0 <= self.sent[s] - self.released[s] <= stream_window
        assert sum(self.sent.values()) - sum(self.released.values()) <= conn_window
        stats = self.receiver.statistics()
        total = stats.receive_available + stats.receive_unreleased + stats.receive_pending_grant
        assert total == conn_window

    def settle(self) -> None:
        """Run everything fairly until all is delivered; fail on a deadlock."""
        for _ in range(100_000):
            progress = any([self.send(s) for s in self.todo])
            progress |= any([self.deliver() for _ in range(len(self.data))])
            for s, n in self.releasable.items():
                if n:
                    self.release(s, n)
                    progress = True
            progress |= self.grant()
            progress |= any([self.credit() for _ in range(len(self.credits))])
            self.check_invariants()
            if not progress:
                return
        raise AssertionError("no quiescence")


@st.composite
def scenarios(draw):
    conn_window = draw(st.integers(1, 200))
    streaming = draw(st.booleans())
    stream_ids = [1] if streaming else draw(st.lists(st.integers(1, 9), min_size=1, max_size=3, unique=True))
    stream_window = draw(st.integers(1, 200))
    largest = min(conn_window, stream_window)  # the deliverability condition
    messages = {s: draw(st.lists(st.integers(0, largest), max_size=8)) for s in stream_ids}
    return Link(conn_window, stream_window, messages, draw(st.integers(1, 50)), streaming), messages


@settings(max_examples=300)
@given(scenario=scenarios(), data=st.data())
def test_random_interleavings_stay_within_window_and_deliver_everything(scenario, data):
    link, messages = scenario
    for _ in range(data.draw(st.integers(0, 200))):
        action = data.draw(st.sampled_from(["send", "deliver", "release", "grant", "credit"]))
        if action == "send":
            link.send(data.draw(st.sampled_from(sorted(link.todo))))
        elif action == "release":
            ready = [s for s, n in link.releasable.items() if n]
            if ready:
                s = data.draw(st.sampled_from(ready))
                link.release(s, data.draw(st.integers(1, link.releasable[s])))
        else:
            getattr(link, action)()
        link.check_invariants()
    link.settle()
    assert link.delivered == messages
    conn_window, _ = link.windows
    assert link.receiver.statistics().receive_available == conn_window
    assert link.sender.statistics().send_available == conn_window
