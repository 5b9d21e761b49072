"""A small typed asyncio client for mistral-serve's ChatService."""

from .client import ChatClient, user_message

__all__ = ["ChatClient", "user_message"]
