"""Every way a user calls tokenmill: the HTTP API, the CLI, the offline `LLM` class.

`from api import LLM, SamplingParams` imports lazily, so `import api` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from api.offline import LLM, CompletionOutput, LoRARequest, RequestOutput
    from model_runner.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "LoRARequest"]


def __getattr__(name: str) -> Any:
    if name == "SamplingParams":
        from model_runner.sampling_params import SamplingParams

        return SamplingParams
    if name in ("LLM", "RequestOutput", "CompletionOutput", "LoRARequest"):
        from api import offline

        return getattr(offline, name)
    raise AttributeError(f"module 'api' has no attribute {name!r}")
