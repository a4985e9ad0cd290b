"""The live explorer: one page at /explore and its JSON API under /explore/api, as a FastAPI router.

`gemmakit serve` includes `router(gemma)` in its app; `gemmakit explore` serves the router alone (`serve`).
Endpoints (POST bodies and answers are JSON):

    GET  /explore                     the page (HTML, CSS and script from gemmakit/explain/static, inlined)
    GET  /explore/api/info            model, SAE (site, width) and store, methods and granularities
    POST /explore/api/tokenize        {prompt, target} -> the pieces of each
    POST /explore/api/generate        {prompt, max_new_tokens} -> {target}: the model's greedy continuation
    POST /explore/api/salience        {prompt, target, span: [a, b], method, granularity, steps?} -> tokens, scores,
                                      each token's segment, segment scores, details
    POST /explore/api/attribute       {prompt, target, span} -> top SAE features for the span (needs an SAE)
    POST /explore/api/features        {text} -> per token, the latents that fire (needs an SAE)
    GET  /explore/api/feature/{id}    a feature's card: logit effects; density, histogram, top contexts (store)
    POST /explore/api/steer           {prompt, feature, value, mode: add|clamp, max_new_tokens} -> default, steered

The explorer computes on a model of its own: gradients, SAE reads and steering put hooks on the module they run
on, and inside `gemmakit serve` other requests generate with the loaded model at the same moment. A quantised
model's float32 copy (needed for gradients anyway) is already private; a float32 model is copied once when the
router is built for a shared app (`isolate=True`, what `gemmakit serve` gets), and used as is by `gemmakit explore`,
where nothing else runs. Only the Generate button uses the loaded model itself (no hooks). Explorer requests run
one at a time (a lock); salience results are kept (a small LRU keyed by prompt, target, span, method), so switching
granularity recomputes nothing.
"""

# No `from __future__ import annotations` here: FastAPI reads the route functions' annotations at runtime, and
# the request models are local to `router`.
import threading
from collections import OrderedDict
from importlib import resources
from pathlib import Path
from typing import Any

from gemmakit.errors import GemmaKitError, InputError

PREFIX = "/explore"


def page_html() -> str:
    """The page with its stylesheet and script inlined (one response, nothing else to route or cache)."""
    static = resources.files("gemmakit.explain") / "static"
    body = (static / "explore.html").read_text(encoding="utf-8")
    css = (static / "explore.css").read_text(encoding="utf-8")
    js = (static / "explore.js").read_text(encoding="utf-8")
    return body.replace("/*__CSS__*/", css).replace("//__JS__", js)


class Explorer:
    """The state behind the API: the model, the optional SAE and store, a lock and the salience cache."""

    def __init__(self, gemma: Any, sae: Any = None, site: str | None = None, store: str | Path | None = None,
                 cache_size: int = 32, isolate: bool = True) -> None:
        from gemmakit.explain.features import open_store, sae_site

        self.gemma, self.sae = gemma, sae
        self.site = sae_site(sae, site) if sae is not None else None
        self.store = open_store(store, self.site) if (store is not None and sae is not None) else None
        self.lock = threading.Lock()
        self.cache: OrderedDict[tuple, Any] = OrderedDict()
        self.cache_size = cache_size
        self.isolate = isolate
        self._work: Any = None
        self.weights = ""

    def work(self) -> Any:
        """The model every hooked computation runs on (see the module docstring): plain float32, never a module
        that another request may be running when `isolate`."""
        if self._work is None:
            import copy

            from gemmakit.api import Gemma
            from gemmakit.explain.salience import float_model

            model, self.weights = float_model(self.gemma)
            if model is self.gemma and self.isolate:
                model = Gemma(copy.deepcopy(self.gemma.module), self.gemma.tokenizer, self.gemma.source)
                self.weights = "a private copy of the model's own float32 weights"
            self._work = model
        return self._work

    def need_sae(self) -> None:
        if self.sae is None:
            raise InputError("no SAE is loaded; start the explorer with --sae PATH")

    def info(self) -> dict[str, Any]:
        from gemmakit.explain.salience import DEFAULT_STEPS, METHODS
        from gemmakit.explain.segments import GRANULARITIES

        sae = None
        if self.sae is not None:
            sae = {"site": self.site, "d_sae": self.sae.d_sae, "architecture": self.sae.architecture,
                   "store": str(self.store.folder) if self.store is not None else None}
        return {"model": str(getattr(self.gemma, "source", "")), "family": self.gemma.config.family,
                "methods": list(METHODS), "granularities": list(GRANULARITIES), "default_steps": DEFAULT_STEPS,
                "sae": sae}

    def tokenize(self, prompt: str, target: str) -> dict[str, Any]:
        from gemmakit.explain.salience import token_pieces

        tok = self.gemma.tokenizer
        return {"prompt": token_pieces(tok, self.gemma.encode(prompt)[1:]) if prompt else [],
                "target": token_pieces(tok, tok.encode(target, add_bos=False)) if target else []}

    def generate(self, prompt: str, max_new_tokens: int) -> dict[str, Any]:
        if not 1 <= max_new_tokens <= 512:
            raise InputError(f"max_new_tokens must be in 1..512, got {max_new_tokens}")
        with self.lock:
            return {"target": self.gemma.generate(prompt, max_new_tokens)}

    def salience(self, prompt: str, target: str, span: list[int], method: str, granularity: str,
                 steps: int | None) -> dict[str, Any]:
        from gemmakit.explain.salience import DEFAULT_STEPS, salience
        from gemmakit.explain.segments import aggregate, segment_ids

        if len(span) != 2:
            raise InputError(f"span must be [start, end] over the target's tokens, got {span}")
        steps = steps or DEFAULT_STEPS
        key = (prompt, target, tuple(span), method, steps if method == "integrated_gradients" else None)
        with self.lock:
            result = self.cache.get(key)
            if result is None:
                result = salience(self.work(), prompt, target=target, span=tuple(span), method=method, steps=steps)
                result.details["weights"] = self.weights
                self.cache[key] = result
                while len(self.cache) > self.cache_size:
                    self.cache.popitem(last=False)
            self.cache.move_to_end(key)
        pieces, scores = result.part("prompt")
        target_pieces, target_scores = result.part("target")
        segs = aggregate(pieces, scores, granularity) + aggregate(target_pieces, target_scores, granularity)
        first = segment_ids(pieces, granularity)
        rest = segment_ids(target_pieces, granularity)
        offset = (first[-1] + 1) if first else 0
        return {"tokens": result.tokens, "prompt_tokens": result.prompt_tokens, "scores": result.scores,
                "segment_of": first + [offset + s for s in rest], "segment_scores": [s.score for s in segs],
                "span": list(result.span), "method": method, "granularity": granularity,
                "signed": method != "grad_l2", "target_logprob": result.target_logprob, "details": result.details,
                "scored_until": result.prompt_tokens + result.span[1] - 1}

    def attribute(self, prompt: str, target: str, span: list[int], top: int) -> dict[str, Any]:
        from gemmakit.explain.features import attribute

        self.need_sae()
        with self.lock:
            result = attribute(self.work(), self.sae, prompt, target=target, span=tuple(span), site=self.site,
                               top=top, store=self.store)
            result.details["weights"] = self.weights
        return result.to_dict(pairs=top)

    def features(self, text: str, top: int) -> dict[str, Any]:
        from gemmakit.scope.explore import text_features

        self.need_sae()
        if not text:
            raise InputError("give a text to look at")
        with self.lock:
            return {"site": self.site, "rows": text_features(self.work(), self.sae, self.site, text, top=top)}

    def feature(self, feature: int) -> dict[str, Any]:
        from gemmakit.explain.features import cached_index, feature_summaries
        from gemmakit.scope.explore import activation_histogram, feature_examples

        self.need_sae()
        if not 0 <= feature < self.sae.d_sae:
            raise InputError(f"feature {feature} does not exist (the SAE has latents 0..{self.sae.d_sae - 1})")
        with self.lock:
            model = self.work()
            summary = feature_summaries(model, self.sae, self.site, [feature], self.store, k=10)[feature]
            card: dict[str, Any] = {"feature": feature, "site": self.site, **summary}
            if self.store is not None:
                index = cached_index(self.store, self.sae)
                card["top"] = feature_examples(model, index, feature, n_top=8)["top"]
                card["histogram"] = activation_histogram(index, feature, bins=20)
        return card

    def steer(self, prompt: str, feature: int, value: float, mode: str, max_new_tokens: int) -> dict[str, Any]:
        from gemmakit.explain.features import steer_generate

        self.need_sae()
        if not 1 <= max_new_tokens <= 256:
            raise InputError(f"max_new_tokens must be in 1..256, got {max_new_tokens}")
        with self.lock:
            return steer_generate(self.work(), self.sae, self.site, feature, value, prompt, mode, max_new_tokens)


def router(gemma: Any, sae: Any = None, site: str | None = None, store: str | Path | None = None,
           prefix: str = PREFIX, isolate: bool = True):
    """A FastAPI router with the page at `prefix` and the API under `prefix`/api (see the module docstring).
    `isolate=False` lets a float32 model be hooked in place (only when nothing else runs on it)."""
    from fastapi import APIRouter, HTTPException
    from fastapi.responses import HTMLResponse
    from pydantic import BaseModel, Field

    state = Explorer(gemma, sae, site, store, isolate=isolate)
    api = APIRouter()

    class TokenizeBody(BaseModel):
        prompt: str = ""
        target: str = ""

    class GenerateBody(BaseModel):
        prompt: str
        max_new_tokens: int = 24

    class SalienceBody(BaseModel):
        prompt: str
        target: str
        span: list[int] = Field(min_length=2, max_length=2)
        method: str = "grad_l2"
        granularity: str = "token"
        steps: int | None = None

    class AttributeBody(BaseModel):
        prompt: str
        target: str
        span: list[int] = Field(min_length=2, max_length=2)
        top: int = 10

    class FeaturesBody(BaseModel):
        text: str
        top: int = 5

    class SteerBody(BaseModel):
        prompt: str
        feature: int
        value: float = 10.0
        mode: str = "add"
        max_new_tokens: int = 24

    def guarded(fn, *args):
        try:
            return fn(*args)
        except GemmaKitError as e:
            raise HTTPException(status_code=400, detail=str(e)) from e

    @api.get(prefix, response_class=HTMLResponse, include_in_schema=False)
    def explore_page() -> str:
        return page_html()

    @api.get(prefix + "/api/info")
    def info() -> dict[str, Any]:
        return state.info()

    @api.post(prefix + "/api/tokenize")
    def tokenize(body: TokenizeBody) -> dict[str, Any]:
        return guarded(state.tokenize, body.prompt, body.target)

    @api.post(prefix + "/api/generate")
    def generate(body: GenerateBody) -> dict[str, Any]:
        return guarded(state.generate, body.prompt, body.max_new_tokens)

    @api.post(prefix + "/api/salience")
    def salience(body: SalienceBody) -> dict[str, Any]:
        return guarded(state.salience, body.prompt, body.target, body.span, body.method, body.granularity,
                       body.steps)

    @api.post(prefix + "/api/attribute")
    def attribute(body: AttributeBody) -> dict[str, Any]:
        return guarded(state.attribute, body.prompt, body.target, body.span, body.top)

    @api.post(prefix + "/api/features")
    def features(body: FeaturesBody) -> dict[str, Any]:
        return guarded(state.features, body.text, body.top)

    @api.get(prefix + "/api/feature/{feature}")
    def feature(feature: int) -> dict[str, Any]:
        return guarded(state.feature, feature)

    @api.post(prefix + "/api/steer")
    def steer(body: SteerBody) -> dict[str, Any]:
        return guarded(state.steer, body.prompt, body.feature, body.value, body.mode, body.max_new_tokens)

    return api


def app(gemma: Any, sae: Any = None, site: str | None = None, store: str | Path | None = None):
    """A FastAPI app serving only the explorer (and `/` redirecting to it); nothing else runs on the model."""
    from fastapi import FastAPI
    from fastapi.responses import RedirectResponse

    application = FastAPI(title="gemmakit explorer")
    application.include_router(router(gemma, sae, site, store, isolate=False))

    @application.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse(PREFIX)

    return application


def serve(gemma: Any, host: str = "127.0.0.1", port: int = 8000, sae: Any = None, site: str | None = None,
          store: str | Path | None = None) -> None:
    """`gemmakit explore`: run the explorer's app with uvicorn until interrupted."""
    import sys

    import uvicorn

    print(f"[explorer at http://{host}:{port}{PREFIX}]", file=sys.stderr)
    uvicorn.run(app(gemma, sae, site, store), host=host, port=port, log_level="warning")
