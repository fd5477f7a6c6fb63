"""The OpenAI-compatible API under /v1/ (CONTRACT §6): the same services and
tasks as the websocket, in OpenAI's formats, behind API keys."""
