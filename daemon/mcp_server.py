"""`ctxfs mcp`: the Model Context Protocol server on stdio (official `mcp` SDK).

The SDK is anyio-based; we run it under trio (`trio.run`), so the trio
LocalClient works inside it. The tools' logic is `daemon.memory.Memory`;
this module only declares the tools and the `ctxfs://ref/{name}` resources
and maps results and errors onto MCP. Every failure of a call reaches the
model as a tool error (`isError`) with one clear line; the server goes on.

Resource updates are told both ways the SDK speaks: `resources/subscribe`
then `notifications/resources/updated` (protocol 2025-11-25, what MCP
clients use today), and `subscriptions/listen` streams (2026-07-28).
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import mcp_types as types
import trio
from mcp.server import Server, ServerRequestContext
from mcp.server.session import ServerSession
from mcp.server.stdio import stdio_server
from mcp.server.subscriptions import InMemorySubscriptionBus, ListenHandler, ResourceUpdated
from mcp.shared.exceptions import MCPError

from daemon.memory import Memory, ToolError
from daemon.paths import HomePaths
from sync import refs

log = logging.getLogger(__name__)

URI_PREFIX = "ctxfs://ref/"
_REF = {"type": "string", "description": "The ref (named memory, e.g. `main` or `projects/x`) to use. Default: {ref}."}

# Resources one client may subscribe to: every subscription is a set entry
# held for the session's life.
MAX_SUBSCRIPTIONS = 1024


def _schema(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(required), "additionalProperties": False}


def tool_definitions(default_ref: str) -> list[types.Tool]:
    ref = {**_REF, "description": _REF["description"].format(ref=default_ref)}
    fact = {
        "anyOf": [
            {"type": "string", "description": "The fact itself, as a String with relevance 1.0."},
            {
                "type": "object",
                "properties": {
                    "content": {"type": "string", "description": "The fact, one self-contained statement."},
                    "type": {"type": "string", "description": "Its type, e.g. String (default), Preference, List[String]."},
                    "relevance": {"type": "number", "minimum": 0, "maximum": 1,
                                  "description": "How relevant it is, 0 to 1 (default 1); recall and context rank by it."},
                    "source": {"type": "string", "description": "Where it came from, e.g. a conversation id (default mcp)."},
                },
                "required": ["content"],
                "additionalProperties": False,
            },
        ]
    }
    message = {"type": "string", "description": "A short note on why (kept in the history, like a commit message)."}
    read_only = types.ToolAnnotations(read_only_hint=True)
    return [
        types.Tool(
            name="remember",
            description="Store facts in the shared memory: one new version of the ref, on top of its current "
                        "value, synced to every machine of the cluster. Returns the new context id and each "
                        "fact's atom hash (forget takes those).",
            input_schema=_schema({"facts": {"type": "array", "minItems": 1, "items": fact,
                                            "description": "The facts: strings, or objects {content, type?, relevance?, source?}."},
                                  "ref": ref, "message": message}, ("facts",)),
            annotations=types.ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=False),
        ),
        types.Tool(
            name="forget",
            description="Remove facts from the memory by their atom hashes (from recall or remember): one new "
                        "version of the ref without them. Earlier versions keep them (see history).",
            input_schema=_schema({"atom_hashes": {"type": "array", "minItems": 1,
                                                  "items": {"type": "string", "pattern": "^[0-9a-fA-F]{64}$"},
                                                  "description": "Hashes of the atoms to remove (64 hex characters)."},
                                  "ref": ref, "message": message}, ("atom_hashes",)),
            annotations=types.ToolAnnotations(read_only_hint=False, destructive_hint=True, idempotent_hint=False),
        ),
        types.Tool(
            name="recall",
            description="Find facts in the memory, most relevant first, filtered by type, relevance and age. "
                        "Returns each atom with its hash, content, type, relevance, time and source.",
            input_schema=_schema({
                "text": {"type": "string", "description": "Words to match in the facts' content (full-text)."},
                "type": {"type": "string", "description": "Only facts whose type unifies with this, e.g. String."},
                "min_relevance": {"type": "number", "minimum": 0, "description": "Only facts at least this relevant."},
                "max_age_seconds": {"type": "number", "minimum": 0, "description": "Only facts at most this old."},
                "limit": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 20,
                          "description": "At most this many facts (default 20)."},
                "ref": ref,
            }),
            annotations=read_only,
        ),
        types.Tool(
            name="context",
            description="The memory as prompt text, one `[Type] fact` line each, most relevant first, within "
                        "a token budget: what to read before starting work.",
            input_schema=_schema({"ref": ref, "max_tokens": {
                "type": "integer", "minimum": 1, "default": 2000, "description": "Token budget (default 2000)."}}),
            annotations=read_only,
        ),
        types.Tool(
            name="history",
            description="The versions of the ref, newest first: id, time, message, atoms added and removed.",
            input_schema=_schema({"ref": ref, "limit": {
                "type": "integer", "minimum": 1, "maximum": 1000, "default": 20,
                "description": "At most this many versions (default 20)."}}),
            annotations=read_only,
        ),
        types.Tool(
            name="refs",
            description="Every ref (named memory) and the context it points at; a ref in conflict lists its candidates.",
            input_schema=_schema({}),
            annotations=read_only,
        ),
        types.Tool(
            name="sync_status",
            description="Whether this machine's memory is in sync with its peers: each peer's state, refs in conflict.",
            input_schema=_schema({}),
            annotations=read_only,
        ),
    ]


def _error(text: str) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(type="text", text=text)], is_error=True)


def ref_uri(name: str) -> str:
    return URI_PREFIX + name


class McpServer:
    """The MCP server of one `ctxfs mcp` process: one stdio connection."""

    def __init__(self, paths: HomePaths, *, default_ref: str = "main") -> None:
        self.memory = Memory(paths, default_ref=default_ref, on_ref_changed=self._ref_changed)
        self.tools = tool_definitions(self.memory.default_ref)
        self._calls = {
            "remember": self.memory.remember,
            "forget": self.memory.forget,
            "recall": self.memory.recall,
            "context": self.memory.context,
            "history": self.memory.history,
            "refs": self.memory.refs,
            "sync_status": self.memory.sync_status,
        }
        self._properties = {t.name: set(t.input_schema["properties"]) for t in self.tools}
        self._subscribed: set[str] = set()  # URIs, subscribed with resources/subscribe
        self._session: ServerSession | None = None  # who subscribed (stdio: the one client)
        self._bus = InMemorySubscriptionBus()
        self.server = Server(
            "ctxfs",
            version="0.1.0",
            instructions="ctxfs is a memory shared by every machine of a cluster. Use `context` at the start of "
                         "a task, `recall` to look facts up, `remember` to keep what will matter later, `forget` "
                         "for what is wrong or stale.",
            on_list_tools=self._list_tools,
            on_call_tool=self._call_tool,
            on_list_resources=self._list_resources,
            on_list_resource_templates=self._list_templates,
            on_read_resource=self._read_resource,
            on_subscribe_resource=self._subscribe,
            on_unsubscribe_resource=self._unsubscribe,
            on_subscriptions_listen=ListenHandler(self._bus),
        )

    # ------------------------------------------------------------ tools

    async def _list_tools(self, ctx: ServerRequestContext, params: Any) -> types.ListToolsResult:
        return types.ListToolsResult(tools=self.tools)

    async def _call_tool(self, ctx: ServerRequestContext, params: types.CallToolRequestParams) -> types.CallToolResult:
        call = self._calls.get(params.name)
        if call is None:
            return _error(f"no tool {params.name!r}; tools: {', '.join(self._calls)}")
        arguments = params.arguments or {}
        unknown = sorted(set(arguments) - self._properties[params.name])
        if unknown:
            known = ", ".join(sorted(self._properties[params.name])) or "none"
            return _error(f"{params.name}: unknown argument {unknown[0]!r} (arguments: {known})")
        try:
            result = await call(**arguments)
        except ToolError as exc:
            return _error(f"{params.name}: {exc}")
        except Exception as exc:  # a bug of ours: the model is told, the server goes on
            log.exception("tool %s failed", params.name)
            return _error(f"{params.name}: internal error ({type(exc).__name__}: {exc}); see the server's log")
        if isinstance(result, str):
            return types.CallToolResult(content=[types.TextContent(type="text", text=result)])
        text = json.dumps(result, ensure_ascii=False)
        return types.CallToolResult(content=[types.TextContent(type="text", text=text)], structured_content=result)

    # ------------------------------------------------------------ resources

    async def _list_resources(self, ctx: ServerRequestContext, params: Any) -> types.ListResourcesResult:
        try:
            listed = (await self.memory.refs())["refs"]
        except ToolError:
            listed = []
        return types.ListResourcesResult(resources=[
            types.Resource(uri=ref_uri(r["name"]), name=r["name"], mime_type="text/plain",
                           description=f"ref {r['name']}: its memory as prompt text, most relevant first")
            for r in listed
        ])

    async def _list_templates(self, ctx: ServerRequestContext, params: Any) -> types.ListResourceTemplatesResult:
        return types.ListResourceTemplatesResult(resource_templates=[
            types.ResourceTemplate(uri_template=URI_PREFIX + "{name}", name="ref", mime_type="text/plain",
                                   description="A ref's memory as prompt text, most relevant first; "
                                               "subscribe to hear when the ref moves, here or on a peer"),
        ])

    def _ref_of(self, uri: str) -> str:
        if not uri.startswith(URI_PREFIX) or len(uri) == len(URI_PREFIX):
            raise MCPError(types.INVALID_PARAMS, f"not a ctxfs resource: {uri!r:.200} (expected {URI_PREFIX}NAME)")
        name = uri[len(URI_PREFIX):]
        try:
            return refs.check_ref_name(name)
        except ValueError as exc:
            raise MCPError(types.INVALID_PARAMS, str(exc)) from None

    async def _read_resource(self, ctx: ServerRequestContext,
                             params: types.ReadResourceRequestParams) -> types.ReadResourceResult:
        name = self._ref_of(str(params.uri))
        try:
            text = await self.memory.expansion_text(name)
        except ToolError as exc:
            raise MCPError(types.INVALID_PARAMS, str(exc)) from None
        return types.ReadResourceResult(contents=[
            types.TextResourceContents(uri=str(params.uri), mime_type="text/plain", text=text)])

    async def _subscribe(self, ctx: ServerRequestContext, params: types.SubscribeRequestParams) -> types.EmptyResult:
        self._ref_of(str(params.uri))
        if str(params.uri) not in self._subscribed and len(self._subscribed) >= MAX_SUBSCRIPTIONS:
            raise MCPError(types.INVALID_PARAMS, f"at most {MAX_SUBSCRIPTIONS} resources may be subscribed at once")
        self._session = ctx.session
        self._subscribed.add(str(params.uri))
        return types.EmptyResult()

    async def _unsubscribe(self, ctx: ServerRequestContext,
                           params: types.UnsubscribeRequestParams) -> types.EmptyResult:
        self._subscribed.discard(str(params.uri))
        return types.EmptyResult()

    async def _ref_changed(self, name: str) -> None:
        """A ref moved (here, in another process, or on a peer): tell subscribers."""
        uri = ref_uri(name)
        if uri in self._subscribed and self._session is not None:
            try:
                await self._session.send_resource_updated(uri)
            except Exception as exc:  # the client left: nobody to tell
                log.info("cannot send resources/updated for %s: %s", uri, exc)
        await self._bus.publish(ResourceUpdated(uri=uri))

    # ------------------------------------------------------------ running

    async def serve_stdio(self) -> None:
        async with stdio_server() as (read_stream, write_stream):
            async with trio.open_nursery() as nursery:
                await nursery.start(self.memory.link.run)
                await self.server.run(read_stream, write_stream, self.server.create_initialization_options())
                nursery.cancel_scope.cancel()


def run_mcp(paths: HomePaths, default_ref: str) -> None:
    """Serve MCP on stdin/stdout until the client closes stdin."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="ctxfs mcp: %(levelname)s %(message)s")
    trio.run(McpServer(paths, default_ref=default_ref).serve_stdio)
