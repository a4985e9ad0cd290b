"""Decoding: step decoders behind one protocol, the place that chooses one, sampling, the engine, the scheduler.

- `protocol`: `StepDecoder` (what every decoder implements) and `EagerDecoder` (the module's forward);
- `compiled`, `native/`: the torch.compile'd and the C++ decoders;
- `choice.choose_decoder`: which decoder runs a model, and why;
- `sampling`: greedy, temperature, top-k/top-p/min-p, the draw;
- `engine.generate_tokens`: one left-padded batch that starts and ends together;
- `scheduler.Scheduler`: continuous batching, requests joining and leaving, with a prefix cache.
"""

from gemmakit.decoding.choice import DecoderChoice, choose_decoder
from gemmakit.decoding.engine import generate_tokens, left_pad
from gemmakit.decoding.prefix_cache import PrefixCache
from gemmakit.decoding.protocol import EagerDecoder, StepDecoder
from gemmakit.decoding.sampling import GREEDY, Sampling
from gemmakit.decoding.scheduler import QueueFull, Request, RequestHandle, Scheduler, TokenEvent

__all__ = ["GREEDY", "DecoderChoice", "EagerDecoder", "PrefixCache", "QueueFull", "Request", "RequestHandle",
           "Sampling", "Scheduler", "StepDecoder", "TokenEvent", "choose_decoder", "generate_tokens", "left_pad"]
