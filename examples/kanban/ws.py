"""Live boards: websocket clients of /ws/boards/{board_id} get every change of their board."""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from typing import Any

from starlette.websockets import WebSocket

import cfk_otel

log = cfk_otel.logger.create_child_logger(component="boards-ws")


class BoardHub:
    """The websocket clients of each board, in this process.

    With several workers each has its own hub and a client sees the changes made through
    its worker only; a deployment with ``--workers`` would fan out through Redis pub/sub.
    """

    def __init__(self) -> None:
        self._clients: defaultdict[str, set[WebSocket]] = defaultdict(set)

    def join(self, board_id: str, websocket: WebSocket) -> None:
        self._clients[board_id].add(websocket)

    def leave(self, board_id: str, websocket: WebSocket) -> None:
        clients = self._clients.get(board_id)
        if clients is not None:
            clients.discard(websocket)
            if not clients:
                del self._clients[board_id]

    def watching(self, board_id: str) -> int:
        return len(self._clients.get(board_id, ()))

    async def publish(self, board_id: str, event: str, ticket: dict[str, Any]) -> None:
        """Send ``{"event": ..., "ticket": ...}`` to every client of the board, concurrently."""
        clients = list(self._clients.get(board_id, ()))
        if not clients:
            return
        message = json.dumps({"event": event, "boardId": board_id, "ticket": ticket})
        results = await asyncio.gather(
            *(asyncio.wait_for(ws.send_text(message), timeout=2) for ws in clients), return_exceptions=True
        )
        for ws, result in zip(clients, results, strict=True):
            if isinstance(result, BaseException):
                # A client that went away, or stalls, gets no more updates.
                log.debug("Dropping board client", boardId=board_id, reason=type(result).__name__)
                self.leave(board_id, ws)
