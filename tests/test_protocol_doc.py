"""docs/protocol.md's vectors and tables match the code."""

import re
from pathlib import Path

from sync import frames
from sync.codec import decode_context
from sync.errors import ErrorCode
from sync.messages import MESSAGE_CLASSES, Credit, MessageType, encode_payload

DOC = (Path(__file__).parent.parent / "docs" / "protocol.md").read_text()


def test_credit_frame_vector():
    payload = encode_payload(Credit(increment=65536))
    frame = frames.encode_frame(frames.Frame(type=MessageType.CREDIT, flags=0, stream_id=3, payload=payload))
    documented = re.search(r"`15 00 00000003 (\w+)` \+ `([^`]+)`", DOC)
    assert documented is not None
    assert frame.hex() == "150000000003" + documented.group(1) + documented.group(2).replace(" ", "")


def test_context_vector_in_doc_decodes_to_its_id():
    hex_block = re.search(r"encodes to the 62 bytes\n\n```\n([0-9a-f\n]+)```", DOC).group(1)
    data = bytes.fromhex(hex_block.replace("\n", ""))
    ctx = decode_context(data)
    assert ctx.id == re.search(r"and has id `([0-9a-f]{64})`", DOC).group(1)


def test_every_message_type_is_documented_with_its_code():
    for msg_type in MESSAGE_CLASSES:
        assert f"| {msg_type.value:#04x} | {msg_type.name.lower()} |" in DOC.lower(), msg_type.name


def test_every_error_code_is_documented():
    for code in ErrorCode:
        assert f"| {code.value} | {code.name} |" in DOC, code.name
