"""Pydantic request and response bodies of the OpenAI-compatible API.

Sampling fields are declared once (bounded, with defaults, descriptions and examples) and shared
by completions and chat. Bounds that depend on the server's flags (max_tokens limit, the model's
context) are checked in app.py, where the settings are known. Unknown request fields are ignored,
as OpenAI's many optional fields (user, metadata, ...) do not change what we compute.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_N = 8  # choices per request: each one is a sequence in the scheduler
MAX_STOP = 4  # stop strings per request, as OpenAI allows
MAX_STOP_CHARS = 256
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's bound for /v1/completions logprobs
MAX_TOP_LOGPROBS = 20  # OpenAI's bound for chat top_logprobs
MAX_MESSAGES = 512
MAX_PROMPTS = 8  # prompts in one batched /v1/completions request


def max_tokens_field(default):
    return Field(default, ge=1, description="most tokens to generate", examples=[64])


temperature_field = Field(1.0, ge=0.0, le=2.0, description="0 = greedy; higher = more random", examples=[0.7])
top_p_field = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling: keep the smallest set of tokens whose probability reaches top_p")
top_k_field = Field(0, ge=0, le=100_000, description="keep only the k most likely tokens (0 = off); an extension to OpenAI's API")
n_field = Field(1, ge=1, le=MAX_N, description="number of choices to generate")
seed_field = Field(None, ge=-(2**63), le=2**63 - 1, description="sampling seed for reproducible output")
penalty_field = Field(0.0, ge=-2.0, le=2.0)
repetition_penalty_field = Field(1.0, gt=0.0, le=10.0, description="divide logits of seen tokens (an extension; 1 = off)")
stop_field = Field(None, description=f"up to {MAX_STOP} strings that end the generation (not included in the output)", examples=[["\n\n"]])


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""
    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, description="ignored: the server serves one model", examples=["model"])
    temperature: float = temperature_field
    top_p: float = top_p_field
    top_k: int = top_k_field
    n: int = n_field
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = stop_field
    seed: int | None = seed_field
    presence_penalty: float = penalty_field
    frequency_penalty: float = penalty_field
    repetition_penalty: float = repetition_penalty_field

    @field_validator("stop")
    @classmethod
    def _bounded_stops(cls, stop):
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings, got {len(stops)}")
        for s in stops:
            if not 0 < len(s) <= MAX_STOP_CHARS:
                raise ValueError(f"each stop string must have 1..{MAX_STOP_CHARS} characters, got {len(s)}")
        return stop

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        ..., description="text, token ids, or a batch of either", examples=["def fibonacci(n):"])
    max_tokens: int | None = max_tokens_field(None)
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS, description="return the log-probabilities of this many top tokens")
    echo: bool = Field(False, description="not supported; must be false")
    suffix: str | None = Field(None, description="not supported; must be null")

    @field_validator("prompt")
    @classmethod
    def _bounded_batch(cls, prompt):
        if isinstance(prompt, list) and not prompt:
            raise ValueError("prompt must not be an empty list")
        if isinstance(prompt, list) and not isinstance(prompt[0], int) and len(prompt) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts in one request, got {len(prompt)}")
        return prompt

    def prompt_batch(self) -> list[str | list[int]]:
        """The prompt as a list of prompts, each text or token ids."""
        if isinstance(self.prompt, str) or isinstance(self.prompt[0], int):
            return [self.prompt]
        return list(self.prompt)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1, max_length=MAX_MESSAGES, examples=[[{"role": "user", "content": "Hello!"}]])
    max_tokens: int | None = max_tokens_field(None)
    max_completion_tokens: int | None = max_tokens_field(None)
    logprobs: bool = Field(False, description="return the log-probability of each output token")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description="with logprobs: this many most likely tokens per position")


# ---------------------------------------------------------------------------------------------
# Responses (documentation for the OpenAPI page; app.py builds the same shapes as dicts)

class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: dict | None
    finish_reason: Literal["stop", "length"] | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: dict | None
    finish_reason: Literal["stop", "length"] | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "nanochat"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
