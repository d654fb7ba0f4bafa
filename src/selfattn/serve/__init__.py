"""`selfattn serve`: an OpenAI-compatible server (Starlette on uvicorn) over one model, with
slots that keep their K/V for the next turn of a conversation, and Prometheus metrics."""

from .api import make_app
from .engine import Engine, QueueFull, Request, Result

__all__ = ["Engine", "Request", "Result", "QueueFull", "make_app"]
