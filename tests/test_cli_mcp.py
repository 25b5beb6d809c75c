"""`ctxfs mcp` as an AI tool starts and leaves it: a client that goes away
mid-answer is the normal end of a stdio server, not a traceback."""

from __future__ import annotations

import json
import os
import subprocess

from process_helpers import COMMAND_BOUND, CTXFS, ctxfs

INITIALIZE = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
              "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}
INITIALIZED = {"jsonrpc": "2.0", "method": "notifications/initialized"}


def test_a_client_that_closes_our_stdout_mid_answer_ends_the_server_quietly(tmp_path):
    home = tmp_path / "h"
    ctxfs(home, "init")
    big = ["fact %d %s" % (i, "x" * 500) for i in range(300)]
    remember = {"jsonrpc": "2.0", "id": 2, "method": "tools/call",
                "params": {"name": "remember", "arguments": {"facts": big}}}
    context = {"jsonrpc": "2.0", "id": 3, "method": "tools/call",
               "params": {"name": "context", "arguments": {"max_tokens": 100000}}}
    env = {k: v for k, v in os.environ.items() if k != "CTXFS_HOME"}
    proc = subprocess.Popen([str(CTXFS), "--home", str(home), "mcp"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        for message in (INITIALIZE, INITIALIZED, remember, context):
            proc.stdin.write((json.dumps(message) + "\n").encode())
        proc.stdin.flush()
        assert proc.stdout.read(20).startswith(b'{"jsonrpc"')  # it answers; then the client goes
        proc.stdout.close()
        proc.stdin.close()
        code = proc.wait(COMMAND_BOUND)
        err = proc.stderr.read().decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    assert err == ""
    assert code == 0
