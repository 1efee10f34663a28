"""The OpenAI wire protocol: request bodies in, response bodies and SSE events out.

This module owns the JSON shapes of `/v1/completions`, `/v1/chat/completions` and
`/v1/models`, and the one place where a request body becomes `SamplingParams`. It is
plain pydantic v2 (what FastAPI parses bodies with) and imports no torch, so the router
starts fast and can be tested without a model.

Two kinds of rejection, both a 400 for the client:
- *Shape* (pydantic `ValidationError` while parsing): wrong types, unknown message roles,
  empty `messages`, an empty `prompt`. FastAPI reports these as 422 by default; the router
  maps them to an OpenAI 400 body whose `param` is the error's `loc`.
- *Meaning* (`InvalidRequestError` from `to_sampling_params`): values out of range, features
  not supported yet. `SamplingParams` validates its own ranges; its errors pass through
  unchanged so there is one message per rule.

Hostile values fail to parse (400): non-finite floats (`1e400` is inf in JSON parsers)
and integers outside int64 (they could not even be sent to a worker). Unknown fields are
kept in `model_extra`: the gateway (`router/gateway/limits.py`) refuses those that ask for
an unsupported feature (`tools`, `response_format`, ...) and ignores the rest, as OpenAI's
SDKs expect of compatible servers. vLLM's extra sampling fields (`top_k`, `min_p`,
`priority`, ...) are kept so vLLM clients keep working; `timeout` (seconds) is pdserve's
own per-request deadline, and `expected_output_tokens` (1..max_tokens) and `slo_class`
(letters, digits, `_.-`, up to 64) are its hints to the SLO planner. Counts and lengths (`n`, `stop`, prompts) are bounded by the
gateway's configurable limits.
"""

from __future__ import annotations

import json
import time
import typing
import uuid
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_serializer, model_validator

from pdserve.errors import InvalidRequestError
from pdserve.sampling_params import SamplingParams

SSE_DONE = "data: [DONE]\n\n"

MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit for /v1/completions `logprobs`
MAX_CHAT_TOP_LOGPROBS = 20  # OpenAI's limit for /v1/chat/completions `top_logprobs`

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

NonEmpty = Field(min_length=1)
Int64 = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]
TokenIds = Annotated[list[Annotated[StrictInt, Field(ge=0, le=INT64_MAX)]], NonEmpty]
# NOTE: every list form is non-empty, so `prompt: []` fails to parse rather than producing
# no requests; `prompts` relies on this to look at element 0.
Prompt = str | Annotated[list[str], NonEmpty] | TokenIds | Annotated[list[TokenIds], NonEmpty]
Role = Literal["system", "developer", "user", "assistant", "tool"]
FinishReason = Literal["stop", "length", "abort"] | None


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def unix_now() -> int:
    return int(time.time())


# -- requests -------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class _SamplingRequest(BaseModel):
    """Fields shared by both endpoints; `None` means "the default" as in OpenAI's API."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    model: str | None = None  # None: the one model served
    temperature: float | None = 1.0
    top_p: float | None = 1.0
    n: Int64 | None = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: Int64 | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    user: str | None = None  # accepted and ignored
    # vLLM extras
    top_k: Int64 | None = None
    min_p: float | None = None
    min_tokens: Int64 = 0
    ignore_eos: bool = False
    stop_token_ids: list[Int64] | None = None
    priority: Int64 = 0  # lower runs first, and is shed last under overload
    # pdserve: seconds until the request is aborted (default: the server's request_timeout_s)
    timeout: Annotated[float, Field(gt=0)] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # pdserve's planner hints (control/planner.py): the output length the client expects
    # (at most max_tokens; the planner plans with it instead of the budget), and the SLO
    # class the request belongs to (`slo_classes` of the server; others: the default SLO).
    expected_output_tokens: Int64 | None = None
    slo_class: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[\w.-]+$")] | None = (
        None
    )

    def _sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        self._check_unsupported()
        self._check_hint(max_tokens)
        return SamplingParams(
            n=_or(self.n, 1),
            temperature=_or(self.temperature, 1.0),
            top_p=_or(self.top_p, 1.0),
            top_k=_or(self.top_k, 0),
            min_p=_or(self.min_p, 0.0),
            seed=self.seed,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            stop=self.stop or (),
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
        )

    def _check_hint(self, max_tokens: int | None) -> None:
        hint = self.expected_output_tokens
        if hint is None:
            return
        if hint < 1:
            raise InvalidRequestError(
                f"expected_output_tokens must be at least 1, got {hint}", "expected_output_tokens"
            )
        if max_tokens is not None and hint > max_tokens:
            raise InvalidRequestError(
                f"expected_output_tokens ({hint}) is more than max_tokens ({max_tokens})",
                "expected_output_tokens",
            )

    def _check_unsupported(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise InvalidRequestError(f"{name} is not supported yet; send 0 or omit it", name)
        if self.stream_options is not None and not self.stream:
            raise InvalidRequestError(
                "stream_options is only allowed when stream is true", "stream_options"
            )


class CompletionRequest(_SamplingRequest):
    """Body of `POST /v1/completions`."""

    prompt: Prompt
    max_tokens: Int64 | None = 16  # OpenAI's default for completions
    logprobs: Int64 | None = None
    echo: bool = False

    @property
    def prompts(self) -> list[str | list[int]]:
        """The prompt(s) as a list: each a string or a list of token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if isinstance(self.prompt[0], int):
            return [list(self.prompt)]
        return list(self.prompt)

    def to_sampling_params(self, default_max_tokens: int | None) -> SamplingParams:
        """`default_max_tokens` applies when the body sends `max_tokens: null`."""
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_COMPLETION_LOGPROBS:
            raise InvalidRequestError(
                f"logprobs must be between 0 and {MAX_COMPLETION_LOGPROBS}, got {self.logprobs}",
                "logprobs",
            )
        if self.echo and self.logprobs is not None:
            # OpenAI then returns the prompt's logprobs too; the engine does not compute them.
            raise InvalidRequestError(
                "echo together with logprobs is not supported yet (no prompt logprobs)", "echo"
            )
        return self._sampling_params(_or(self.max_tokens, default_max_tokens), self.logprobs)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One message; `name`, `tool_calls`, `tool_call_id` and the like are ignored for now."""

    model_config = ConfigDict(extra="ignore")

    role: Role
    content: str | list[TextPart] | None = None

    @model_validator(mode="after")
    def _content_required(self) -> ChatMessage:
        # Only an assistant message (one that made tool calls) may come without content.
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content")
        return self

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingRequest):
    """Body of `POST /v1/chat/completions`."""

    messages: Annotated[list[ChatMessage], NonEmpty]
    max_tokens: Int64 | None = None  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: Int64 | None = None
    logprobs: bool = False
    top_logprobs: Int64 | None = None

    def to_sampling_params(self, default_max_tokens: int | None) -> SamplingParams:
        """`default_max_tokens` applies when neither max_completion_tokens nor max_tokens is set."""
        max_tokens = _or(self.max_completion_tokens, _or(self.max_tokens, default_max_tokens))
        return self._sampling_params(max_tokens, self._num_logprobs())

    def _num_logprobs(self) -> int | None:
        if self.top_logprobs is None:
            return 0 if self.logprobs else None
        if not self.logprobs:
            raise InvalidRequestError("top_logprobs requires logprobs to be true", "top_logprobs")
        if not 0 <= self.top_logprobs <= MAX_CHAT_TOP_LOGPROBS:
            raise InvalidRequestError(
                f"top_logprobs must be between 0 and {MAX_CHAT_TOP_LOGPROBS}, "
                f"got {self.top_logprobs}",
                "top_logprobs",
            )
        return self.top_logprobs


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


# -- responses ------------------------------------------------------------------------------


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens served from the prefix cache (any tier)


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None

    @classmethod
    def of(
        cls, num_prompt_tokens: int, num_completion_tokens: int, num_cached_tokens: int = 0
    ) -> UsageInfo:
        return cls(
            prompt_tokens=num_prompt_tokens,
            completion_tokens=num_completion_tokens,
            total_tokens=num_prompt_tokens + num_completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=num_cached_tokens),
        )


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy logprobs object: parallel lists, one entry per token."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionResponseChoice(BaseModel):
    text: str
    index: int
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason = None


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: random_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=unix_now)
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionResponseChoice]
    usage: UsageInfo


class CompletionStreamResponse(BaseModel):
    """One SSE chunk; OpenAI reuses `text_completion` as the object of stream chunks."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=unix_now)
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionResponseChoice]
    usage: UsageInfo | None = None  # only on the last chunk, with include_usage


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatCompletionResponseChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason = None


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: random_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=unix_now)
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatCompletionResponseChoice]
    usage: UsageInfo


class DeltaMessage(BaseModel):
    """The increment in a chat stream chunk; unset keys are left out, as OpenAI does."""

    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _drop_none(self, handler: Any) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatCompletionStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason = None


class ChatCompletionStreamResponse(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=unix_now)
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatCompletionStreamChoice]
    usage: UsageInfo | None = None  # only on the last chunk, with include_usage


class ModelCard(BaseModel):
    """vLLM's card: OpenAI's four fields plus `root`, `parent` and `max_model_len`, which
    are left out while unset."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=unix_now)
    owned_by: str = "pdserve"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None

    @model_serializer(mode="wrap")
    def _drop_unset_extras(self, handler: Any) -> dict[str, Any]:
        extras = ("root", "parent", "max_model_len")
        return {k: v for k, v in handler(self).items() if k not in extras or v is not None}


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard] = Field(default_factory=list)


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


def error_body(
    message: str,
    type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    """The JSON body OpenAI sends with a 4xx/5xx: `{"error": {message, type, param, code}}`
    (`ErrorResponse`'s shape, built directly: it is on the path of every fast refusal)."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def validation_error_param(model: type[BaseModel], loc: Sequence[int | str]) -> str | None:
    """The OpenAI `param` for a pydantic error location, e.g. `messages[0].role`.

    Pydantic puts the name of each union member it tried into `loc` (`("prompt",
    "list[int]", 0)`); those are not fields, so the location is walked against the model's
    fields and anything that is neither a field of the current model nor a list index is
    dropped.
    """
    param = ""
    current: type[BaseModel] | None = model
    for part in loc:
        if isinstance(part, int):
            param += f"[{part}]"
        elif current is not None and part in current.model_fields:
            param += f".{part}" if param else part
            current = _first_model(current.model_fields[part].annotation)
    return param or None


def _first_model(annotation: Any) -> type[BaseModel] | None:
    """The first pydantic model class inside a type annotation (`list[ChatMessage]` ->
    ChatMessage), or None."""
    args = typing.get_args(annotation)  # (), or the members of a union or generic
    if not args:
        is_model = isinstance(annotation, type) and issubclass(annotation, BaseModel)
        return annotation if is_model else None
    return next((m for m in map(_first_model, args) if m is not None), None)


def sse_event(payload: BaseModel | dict[str, Any]) -> str:
    """One server-sent event carrying `payload` as compact JSON."""
    if isinstance(payload, BaseModel):
        data = payload.model_dump_json()
    else:
        data = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    return f"data: {data}\n\n"
