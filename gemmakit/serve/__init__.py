"""gemmakit serve: an OpenAI-compatible HTTP server (chat, completions, moderations, tokenize) over the engine's
continuous-batching scheduler, with an optional safety guard, Prometheus metrics and a web chat page.

    from gemmakit.serve import ServeOptions, create_app
    app = create_app(gemmakit.load("default"), ServeOptions(slots=8))   # any ASGI server runs it

`gemmakit serve MODEL` starts it with uvicorn; docs/serve.md has the details.
"""

from gemmakit.serve.app import create_app
from gemmakit.serve.options import ServeOptions

__all__ = ["ServeOptions", "create_app"]
