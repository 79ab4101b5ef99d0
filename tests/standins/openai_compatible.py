"""A tiny OpenAI-compatible chat-completions server on loopback (``http.server``, a thread of the test process):
answers every ``POST /v1/chat/completions`` with a fixed reply and records what it was sent, so the judge hook is
tested through the real ``openai`` client over real HTTP."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class OpenAICompatibleStandIn:
    """``reply(request_body) -> str`` gives the assistant's content (default: ``"7"``); ``requests`` holds
    ``{"path", "authorization", "body"}`` of each call; ``status`` (default 200) lets a test make it fail."""

    def __init__(self, reply: Callable[[dict[str, Any]], str] | None = None, status: int = 200) -> None:
        self.reply = reply or (lambda body: "7")
        self.status = status
        self.requests: list[dict[str, Any]] = []
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))) or b"{}")
                standin.requests.append(
                    {"path": self.path, "authorization": self.headers.get("Authorization"), "body": body}
                )
                if self.path.rstrip("/") != "/v1/chat/completions":
                    self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
                elif standin.status != 200:
                    self._send(standin.status, {"error": {"message": "stand-in failure", "type": "server_error"}})
                else:
                    self._send(200, _completion(body.get("model", "judge"), standin.reply(body)))

            def _send(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> OpenAICompatibleStandIn:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def _completion(model: str, content: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-standin",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
