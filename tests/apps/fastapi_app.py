"""A FastAPI app with a router and no telemetry code."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, HTTPException

router = APIRouter(prefix="/api/boards")


@router.get("/{board_id}/cards/{card_id}")
async def card(board_id: int, card_id: int) -> dict[str, int]:
    return {"board": board_id, "card": card_id}


app = FastAPI()
app.include_router(router)


@app.get("/hello")
async def hello() -> dict[str, str]:
    return {"hello": "fastapi"}


@app.get("/api/tickets/{ticket_id}")
async def ticket(ticket_id: str) -> dict[str, str]:
    if ticket_id == "missing":
        raise HTTPException(status_code=404, detail="no such ticket")
    return {"id": ticket_id}
