"""Everything a server is configured with, in one value that the CLI fills and tests build directly."""

from __future__ import annotations

from dataclasses import dataclass, field

from gemmakit.errors import InputError


@dataclass
class ServeOptions:
    model_name: str = "default"              # the id clients send as `model` and /v1/models lists
    api_keys: list[str] = field(default_factory=list)   # none: no authentication
    slots: int = 8                           # requests decoded together
    context: int = 4096                      # KV capacity per slot (prompt + output tokens)
    prefix_cache_mb: int = 256               # prefix cache budget (0 = off)
    prefill_chunk: int = 64                  # prompt tokens prefilled between two decode steps
    max_queue: int = 64                      # waiting requests beyond this get 429
    max_body_bytes: int = 1 << 20            # 413 above this
    completion_max_tokens: int = 16          # /v1/completions' default max_tokens (OpenAI's)
    guard: list[str] | None = None           # --guard policies; None: off
    guard_action: str = "block"
    guard_threshold: float = 0.5
    guard_chunk_chars: int = 200
    moderation_model: str | None = None      # a second checkpoint (ShieldGemma) for /v1/moderations and the guard
    moderation_adapter: str | None = None    # an agile classifier directory (safety train-agile)
    moderation_policies: list[str] | None = None   # default: ShieldGemma's four advertised policies
    moderation_threshold: float = 0.5
    explore: bool = True                     # mount gemmakit.explain.web at /explore when it is installed

    def check(self) -> ServeOptions:
        for name in ("slots", "context", "max_queue", "max_body_bytes", "prefill_chunk", "completion_max_tokens"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.prefix_cache_mb < 0:
            raise InputError(f"prefix_cache_mb must be >= 0, got {self.prefix_cache_mb}")
        if self.guard_action not in ("block", "annotate"):
            raise InputError(f"guard_action must be block or annotate, got {self.guard_action!r}")
        for name in ("guard_threshold", "moderation_threshold"):
            if not 0 <= getattr(self, name) <= 1:
                raise InputError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        return self
