"""An app from the docs on two workers: `serve_workers(env, app="tests.workers.documented:app")`.

The docs page's `# file:` block is written by the test into a directory on `PYTHONPATH`, and
`DOCUMENTED_APP` names its module (its ASGI app is `app`). Here every response gains the
worker's pid (`X-Worker-Pid`), and `/health` is answered before the app sees it, so the
documented code is served exactly as written.
"""

import importlib
import os
from typing import Any

from starlette.types import Message, Receive, Scope, Send

documented: Any = importlib.import_module(os.environ["DOCUMENTED_APP"]).app
_PID = str(os.getpid()).encode()


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    async def send_with_pid(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", ()), (b"x-worker-pid", _PID)]}
        await send(message)

    if scope["type"] == "http" and scope["path"] == "/health":
        await send_with_pid({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})
        return
    await documented(scope, receive, send_with_pid)
