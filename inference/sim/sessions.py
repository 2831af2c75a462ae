"""SGLang's session control (sglang 0.5.23 `srt/session/session_controller.py`).

`POST /open_session` `{"capacity_of_str_len", "session_id"?, "streaming"?,
"timeout"?}` answers the session's id (a JSON string; a new uuid hex unless
given); an id already open is refused (400). `POST /close_session`
`{"session_id"}` answers 200, an unknown id too.

A `/generate` request with `session_params` `{"id", "rid"?, "offset"?,
"replace"?, "drop_previous_output"?}` continues the session: its input is the
request `rid` names' input and output (only its input with
`drop_previous_output`), cut at `offset` when given (non-zero), followed by its
own ids. The session keeps a tree of its requests:
- without `replace`, the request becomes a child of `rid` (a root when `rid`
  is None), which must have finished;
- with `replace`, `rid`'s unfinished request is aborted and its children are
  dropped first (every request of the session when `rid` is None).
A request the session cannot take is aborted at once (400), with SGLang's
message: an unknown session or `rid`, an unfinished `rid` to append to, an
input left empty.

A streaming session (`"streaming": true`, which needs
`--enable-streaming-session`) only appends: one request at a time, each after
the last that finished; `replace`, `offset` and `drop_previous_output` are
refused. A session with a `timeout` (seconds) closes after that long without a
request. The prefix cache does the rest: a session's next input starts with
what the last one computed.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

SESSION_PARAM_KEYS = frozenset({"id", "rid", "offset", "replace", "drop_previous_output"})


class SessionError(ValueError):
    """A session request refused before it starts (HTTP 400)."""


@dataclass(slots=True)
class SessionNode:
    rid: str
    input_ids: list[int]
    parent: SessionNode | None = None
    children: list[SessionNode] = field(default_factory=list)
    output_ids: list[int] | None = None  # None until the request has finished

    @property
    def finished(self) -> bool:
        return self.output_ids is not None

    def subtree(self) -> list[SessionNode]:
        nodes, stack = [], [self]
        while stack:
            node = stack.pop()
            nodes.append(node)
            stack.extend(node.children)
        return nodes


@dataclass(slots=True)
class Session:
    session_id: str
    capacity_of_str_len: int
    streaming: bool
    timeout: float | None
    last_active: float
    nodes: dict[str, SessionNode] = field(default_factory=dict)
    inflight: str | None = None  # a streaming session's running request


@dataclass(frozen=True, slots=True)
class SessionPlan:
    """What a session request runs: its whole input, and the session's
    requests it aborts first (`replace`)."""

    input_ids: list[int]
    abort_rids: tuple[str, ...] = ()


class Sessions:
    def __init__(self, *, streaming_enabled: bool, clock: Callable[[], float] = time.monotonic) -> None:
        self.streaming_enabled = streaming_enabled
        self._clock = clock
        self._sessions: dict[str, Session] = {}
        self._by_rid: dict[str, tuple[Session, SessionNode]] = {}  # requests not yet finished

    def open(self, body: object) -> str:
        if not isinstance(body, dict) or not _is_int(body.get("capacity_of_str_len")):
            raise SessionError("capacity_of_str_len: Input should be a valid integer")
        session_id = body.get("session_id")
        streaming, timeout = body.get("streaming"), body.get("timeout")
        if session_id is not None and not isinstance(session_id, str):
            raise SessionError("session_id: Input should be a valid string")
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))):
            raise SessionError("timeout: Input should be a valid number")
        if streaming and not self.streaming_enabled:
            raise SessionError("Streaming sessions are disabled. Please relaunch with --enable-streaming-session.")
        self._reap()
        session_id = session_id if session_id is not None else uuid.uuid4().hex
        if session_id in self._sessions:
            raise SessionError("Failed to open the session. Check if a session with the same id is still open.")
        self._sessions[session_id] = Session(session_id, body["capacity_of_str_len"], bool(streaming),
                                             float(timeout) if timeout is not None else None, self._clock())
        return session_id

    def close(self, body: object) -> None:
        if not isinstance(body, dict) or not isinstance(body.get("session_id"), str):
            raise SessionError("session_id: Field required")
        session = self._sessions.pop(body["session_id"], None)
        if session is not None:
            for node in session.nodes.values():
                self._by_rid.pop(node.rid, None)

    def plan(self, params: object, *, rid: str, input_ids: list[int],
             output_so_far: Callable[[str], list[int]] = lambda rid: []) -> SessionPlan:
        """The input of request `rid` (its own ids `input_ids`) in the session
        `params` names, recorded in the session's tree; SessionError with
        SGLang's message when the session cannot take it. `output_so_far`
        gives an unfinished request's output (a replaced one continues from it)."""
        if not isinstance(params, dict) or set(params) - SESSION_PARAM_KEYS:
            unknown = sorted(set(params) - SESSION_PARAM_KEYS) if isinstance(params, dict) else []
            raise SessionError(f"session_params: unexpected keys {unknown}" if unknown
                               else "session_params: Input should be a valid dictionary")
        self._reap()
        session_id, parent_rid = params.get("id"), params.get("rid")
        offset = params.get("offset")
        replace, drop_output = bool(params.get("replace")), bool(params.get("drop_previous_output"))
        if offset is not None and not _is_int(offset):
            raise SessionError("session_params.offset: Input should be a valid integer")
        session = self._sessions.get(session_id) if isinstance(session_id, str) else None
        if session is None:
            raise SessionError(f"Invalid request: session id {session_id} does not exist")
        parent: SessionNode | None = None
        aborted: list[str] = []
        if session.streaming:
            if session.inflight is not None:
                raise SessionError("Streaming session already has an active request.")
            if replace:
                raise SessionError("Streaming sessions do not support replace.")
            if drop_output:
                raise SessionError("Streaming sessions do not support drop_previous_output.")
            if offset:
                raise SessionError("Streaming sessions do not support offset.")
            parent = next(iter(session.nodes.values()), None)
        elif replace:
            if parent_rid is None:
                for node in list(session.nodes.values()):
                    if node.parent is None:
                        aborted += self._drop(session, node)
            else:
                parent = session.nodes.get(parent_rid)
                if parent is None:
                    raise SessionError("Invalid request session id")
                if not parent.finished:
                    aborted.append(parent.rid)
                for child in parent.children:
                    aborted += self._drop(session, child)
                parent.children = []
        elif parent_rid is not None:
            parent = session.nodes.get(parent_rid)
            if parent is None:
                raise SessionError("Invalid request session id")
            if not parent.finished:
                raise SessionError("Session request is appending to a request that hasn't finished.")
        if parent is not None:
            output = parent.output_ids if parent.finished else output_so_far(parent.rid)
            history = list(parent.input_ids) if drop_output else parent.input_ids + output
            full = history[:offset] + input_ids if offset else history + input_ids
        else:
            full = list(input_ids)
        if not full:
            raise SessionError("A session request must contain input tokens after restoring history.")
        node = SessionNode(rid, full)
        session.last_active = self._clock()
        if session.streaming:
            session.inflight = rid
        else:
            node.parent = parent
            if parent is not None:
                parent.children.append(node)
            session.nodes[rid] = node
        self._by_rid[rid] = (session, node)
        return SessionPlan(full, tuple(aborted))

    def finished(self, rid: str, output_ids: list[int], *, completed: bool) -> None:
        """Request `rid` ended: its output is what a continuation appends. A
        streaming session keeps only its last completed request."""
        entry = self._by_rid.pop(rid, None)
        if entry is None:
            return
        session, node = entry
        node.output_ids = list(output_ids)
        if session.streaming:
            session.inflight = None
            if completed:
                session.nodes = {rid: node}

    def _drop(self, session: Session, node: SessionNode) -> list[str]:
        """Remove `node` and its subtree from the session; the unfinished ones' rids (to abort)."""
        unfinished = []
        for dropped in node.subtree():
            session.nodes.pop(dropped.rid, None)
            if not dropped.finished:
                unfinished.append(dropped.rid)
        return unfinished

    def _reap(self) -> None:
        now = self._clock()
        for session_id in [sid for sid, session in self._sessions.items()
                           if session.timeout is not None and now - session.last_active > session.timeout]:
            self.close({"session_id": session_id})


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
