"""The built-in workloads of `pdserve bench`: what to send, and the latency targets it is
judged by.

- `Workload`: a name, a description, a default `SLO`, and `sample(num_requests, seed,
  tokenizer)` returning `RequestSpec`s. Sampling is seeded and reproducible: the same seed
  gives the same bytes; every text, shared prefixes included, derives from the seed, so
  runs with different seeds share nothing a prefix cache could carry over.
- `WORKLOADS`: `chat`, `code`, `summarize` (independent requests with sampled lengths),
  `rag` (a few long documents shared as prefixes), `multiturn` (conversations whose
  history grows turn by turn, sent as chat `messages`), `agent` (one long tool description
  shared by every request plus a growing scratchpad), `random` (fixed lengths).
- `get_workload(name)`: a registered workload, or `random:in=N[-M],out=N[-M]`.

Lengths are tokens as the server counts them (`usage.prompt_tokens`, BOS included). With a
tokenizer the prompts hit their sampled length exactly and `num_prompt_tokens` holds the
measured count; without one it is an estimate (`bench/prompts.py`) and stays None.

Sessions (`multiturn`, `agent`): each request carries `session_id`, and a session's turns
appear in order, interleaved with those of other active sessions. A turn's prompt is the
previous turn's prompt, byte for byte, plus a stand-in for the reply (words of the
previous turn's `max_tokens` length) and new input — so prompts are fixed at sampling
time and a prefix cache hits on the whole previous prompt. The load generator should
treat a session as a dependency chain: send a turn no earlier than the completion of the
previous turn of its session.

Default SLOs suit the built-in 56M model on the 2-core CPU machine (measured against
`pdserve serve`, 1 prefill + 1 decode worker of 1 thread: TTFT ≈ 60 ms + 1.5 ms per prompt
token up to 1k tokens, 3.2 s at 2k, 10 s at 4k; TPOT ≈ 25 ms alone, ~80 ms at 8
concurrent requests, ~150 ms at 32): met by ≥ 90 % of requests at low load and missed
under load. Reasons per workload are in `docs/bench.md`.
"""

from __future__ import annotations

import dataclasses
import math
import random
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pdserve.bench.prompts import PromptText
from pdserve.bench.types import SLO, RequestSpec
from pdserve.errors import ConfigError


# ----------------------------------------------------------------------- length distributions
@dataclass(frozen=True, slots=True)
class LogNormal:
    """A long-tailed length: exp(N(ln median, sigma²)), rounded and clipped to [low, high]."""

    median: float
    sigma: float
    low: int
    high: int

    def sample(self, rng: random.Random) -> int:
        value = round(rng.lognormvariate(math.log(self.median), self.sigma))
        return min(max(value, self.low), self.high)

    def __str__(self) -> str:
        return f"lognormal median {self.median:g} sigma {self.sigma:g} in [{self.low}, {self.high}]"


@dataclass(frozen=True, slots=True)
class Uniform:
    """A length drawn uniformly from [low, high]; fixed when low == high."""

    low: int
    high: int

    def sample(self, rng: random.Random) -> int:
        return self.low if self.low == self.high else rng.randint(self.low, self.high)

    def __str__(self) -> str:
        return str(self.low) if self.low == self.high else f"{self.low}-{self.high}"


Length = LogNormal | Uniform


# ------------------------------------------------------------------------------ the base class
@dataclass
class _Draw:
    """One sampling pass: `rng` draws lengths and choices, `words_rng` only prompt words, so
    the lengths a seed gives do not depend on the tokenizer."""

    rng: random.Random
    words_rng: random.Random
    text: PromptText

    def words(self, num_tokens: int) -> str:
        return self.text.words(self.words_rng, num_tokens)

    def prompt(
        self, num_tokens: int, head: str = "", head_tokens: int | None = None
    ) -> tuple[str, int]:
        return self.text.prompt(self.words_rng, num_tokens, head, head_tokens)


@dataclass(frozen=True)
class Workload(ABC):
    """A named request generator with default SLOs; subclasses add their parameters as
    fields and implement `_sample`, drawing only from `draw` so a seed fixes everything."""

    name: str
    description: str
    default_slo: SLO

    def sample(self, num_requests: int, seed: int = 0, tokenizer: Any = None) -> list[RequestSpec]:
        """`num_requests` specs, the same for the same seed (and tokenizer)."""
        if num_requests < 0:
            raise ConfigError("num_requests", f"must be >= 0, got {num_requests}")
        draw = _Draw(
            random.Random(f"{self.name}/{seed}/lengths"),
            random.Random(f"{self.name}/{seed}/words"),
            PromptText(tokenizer),
        )
        return self._sample(draw, num_requests)

    @abstractmethod
    def _sample(self, draw: _Draw, num_requests: int) -> list[RequestSpec]: ...


# --------------------------------------------------------------------- independent requests
@dataclass(frozen=True)
class SingleTurnWorkload(Workload):
    """Independent completions: a prompt of a sampled length, a sampled output length."""

    input_tokens: Length = Uniform(512, 512)
    output_tokens: Length = Uniform(128, 128)

    def _sample(self, draw: _Draw, num_requests: int) -> list[RequestSpec]:
        specs = []
        for _ in range(num_requests):
            prompt, count = draw.prompt(self.input_tokens.sample(draw.rng))
            max_tokens = self.output_tokens.sample(draw.rng)
            specs.append(_completion(draw, prompt, count, max_tokens))
        return specs


def _completion(draw: _Draw, prompt: str, count: int, max_tokens: int, **kw: Any) -> RequestSpec:
    return RequestSpec(
        prompt=prompt, max_tokens=max_tokens, num_prompt_tokens=draw.text.measured(count), **kw
    )


# ------------------------------------------------------------------------- shared documents
@dataclass(frozen=True)
class RagWorkload(Workload):
    """One of a few long documents, then a short question. Document i is picked with weight
    1 / (i + 1) ** popularity_exponent (Zipf), so most requests share a few prefixes."""

    num_documents: int = 4
    document_tokens: Length = Uniform(1024, 2048)
    question_tokens: Length = LogNormal(32, 0.5, 8, 128)
    output_tokens: Length = LogNormal(64, 0.6, 16, 256)
    popularity_exponent: float = 1.0

    def _sample(self, draw: _Draw, num_requests: int) -> list[RequestSpec]:
        heads = [self._document(draw) for _ in range(self.num_documents)]
        weights = [1 / (i + 1) ** self.popularity_exponent for i in range(len(heads))]
        specs = []
        for _ in range(num_requests):
            head, head_tokens = heads[draw.rng.choices(range(len(heads)), weights)[0]]
            num_tokens = head_tokens + self.question_tokens.sample(draw.rng)
            prompt, count = draw.prompt(num_tokens, head, head_tokens)
            specs.append(_completion(draw, prompt, count, self.output_tokens.sample(draw.rng)))
        return specs

    def _document(self, draw: _Draw) -> tuple[str, int]:
        """The shared prefix: document text and the question label; and its token count."""
        document, _ = draw.prompt(self.document_tokens.sample(draw.rng), "document:")
        head = f"{document}\n\nquestion:"
        return head, draw.text.count(head)


# --------------------------------------------------------------------------------- sessions
def _interleave(
    rng: random.Random,
    make_session: Callable[[int], list[RequestSpec]],
    num_requests: int,
    num_active: int,
) -> list[RequestSpec]:
    """Turns of up to `num_active` sessions at a time, each session's in order; a finished
    session is replaced by a new one until `num_requests` turns are out."""
    active: list[list[RequestSpec]] = []
    specs: list[RequestSpec] = []
    next_index = 0
    while len(specs) < num_requests:
        while len(active) < num_active:
            active.append(make_session(next_index))
            next_index += 1
        pick = rng.randrange(len(active))
        specs.append(active[pick].pop(0))
        if not active[pick]:
            active.pop(pick)
    return specs


@dataclass(frozen=True)
class MultiturnWorkload(Workload):
    """Chat sessions: a shared system message, then turns whose `messages` hold the whole
    conversation so far (stand-in assistant replies) plus a new user message."""

    system_tokens: int = 128
    turns: Length = Uniform(2, 6)
    user_tokens: Length = LogNormal(48, 0.7, 8, 256)
    output_tokens: Length = LogNormal(96, 0.6, 16, 384)
    num_active_sessions: int = 8

    def _sample(self, draw: _Draw, num_requests: int) -> list[RequestSpec]:
        system = {"role": "system", "content": draw.words(self.system_tokens)}
        return _interleave(
            draw.rng,
            lambda index: self._session(draw, system, f"{self.name}-{index}"),
            num_requests,
            self.num_active_sessions,
        )

    def _session(self, draw: _Draw, system: dict[str, str], session_id: str) -> list[RequestSpec]:
        messages = [system]
        specs: list[RequestSpec] = []
        for _ in range(self.turns.sample(draw.rng)):
            if specs:
                reply = draw.words(specs[-1].max_tokens)
                messages = [*messages, {"role": "assistant", "content": reply}]
            user = draw.words(self.user_tokens.sample(draw.rng))
            messages = [*messages, {"role": "user", "content": user}]
            specs.append(
                RequestSpec(
                    messages=messages,
                    max_tokens=self.output_tokens.sample(draw.rng),
                    num_prompt_tokens=draw.text.count_chat(messages),
                    session_id=session_id,
                )
            )
        return specs


@dataclass(frozen=True)
class AgentWorkload(Workload):
    """Tool-using agent runs: a long tool description shared by every request, a task, and a
    scratchpad that grows by a stand-in thought/action and an observation per step."""

    system_tokens: int = 1536
    num_tools: int = 12
    task_tokens: Length = LogNormal(64, 0.5, 16, 256)
    steps: Length = Uniform(2, 6)
    output_tokens: Length = LogNormal(48, 0.5, 16, 192)
    observation_tokens: Length = LogNormal(128, 0.8, 16, 768)
    num_active_sessions: int = 8
    # Several agents (tool descriptions); a session picks agent i with weight
    # 1 / (i + 1) ** popularity_exponent (Zipf). One agent: every session shares it.
    num_systems: int = 1
    popularity_exponent: float = 1.0

    def _sample(self, draw: _Draw, num_requests: int) -> list[RequestSpec]:
        systems = [self._tools(draw) for _ in range(self.num_systems)]
        weights = [1 / (i + 1) ** self.popularity_exponent for i in range(len(systems))]

        def pick() -> str:  # one agent: no draw, so its seeds give what they always gave
            return systems[0] if len(systems) == 1 else draw.rng.choices(systems, weights)[0]

        return _interleave(
            draw.rng,
            lambda index: self._session(draw, pick(), f"{self.name}-{index}"),
            num_requests,
            self.num_active_sessions,
        )

    def _tools(self, draw: _Draw) -> str:
        """The shared system prompt: `num_tools` tool lines, `system_tokens` long in all."""
        names = [f"{draw.words(1)}_{draw.words(1)}" for _ in range(self.num_tools)]
        per_tool = self.system_tokens // (self.num_tools + 1)
        lines = [f"{name}: {draw.words(per_tool)}" for name in names[:-1]]
        head = "you can call these tools:\n" + "\n".join(lines) + f"\n{names[-1]}:"
        text, _ = draw.prompt(self.system_tokens, head)
        return text

    def _session(self, draw: _Draw, system: str, session_id: str) -> list[RequestSpec]:
        task = draw.words(self.task_tokens.sample(draw.rng))
        prompt = f"{system}\n\ntask: {task}\nthought:"
        specs: list[RequestSpec] = []
        for _ in range(self.steps.sample(draw.rng)):
            if specs:
                action = draw.words(specs[-1].max_tokens)
                observation = draw.words(self.observation_tokens.sample(draw.rng))
                prompt = f"{prompt} {action}\nobservation: {observation}\nthought:"
            max_tokens = self.output_tokens.sample(draw.rng)
            count = draw.text.count(prompt)
            specs.append(_completion(draw, prompt, count, max_tokens, session_id=session_id))
        return specs


# ------------------------------------------------------------------------------ the registry
_RANDOM_DEFAULTS = {"in": Uniform(512, 512), "out": Uniform(128, 128)}
_RANDOM_SLO = SLO(ttft_ms=2000, tpot_ms=100)


def _random(name: str, lengths: dict[str, Uniform]) -> SingleTurnWorkload:
    return SingleTurnWorkload(
        name=name,
        description=f"random words: input {lengths['in']} tokens, output {lengths['out']}",
        default_slo=_RANDOM_SLO,
        input_tokens=lengths["in"],
        output_tokens=lengths["out"],
    )


def _builtin_workloads() -> dict[str, Workload]:
    chat_in, chat_out = LogNormal(160, 1.0, 4, 1024), LogNormal(128, 0.9, 4, 1024)
    code_in, code_out = LogNormal(64, 0.5, 8, 384), LogNormal(32, 0.5, 4, 128)
    sum_in, sum_out = LogNormal(1536, 0.35, 1024, 4096), LogNormal(96, 0.5, 16, 256)
    workloads: list[Workload] = [
        SingleTurnWorkload(
            "chat",
            f"ShareGPT-like chat: input {chat_in}, output {chat_out}",
            SLO(ttft_ms=1500, tpot_ms=100),
            chat_in,
            chat_out,
        ),
        SingleTurnWorkload(
            "code",
            f"code completion, tight TTFT: input {code_in}, output {code_out}",
            SLO(ttft_ms=400, tpot_ms=50),
            code_in,
            code_out,
        ),
        SingleTurnWorkload(
            "summarize",
            f"long documents, short summaries: input {sum_in}, output {sum_out}",
            SLO(ttft_ms=6000, tpot_ms=100),
            sum_in,
            sum_out,
        ),
        RagWorkload(
            "rag",
            "4 shared documents of 1024-2048 tokens (Zipf popularity) + a short question",
            SLO(ttft_ms=1000, tpot_ms=100),
        ),
        MultiturnWorkload(
            "multiturn",
            "chat sessions of 2-6 turns, whole history resent (chat messages)",
            SLO(ttft_ms=1000, tpot_ms=100),
        ),
        AgentWorkload(
            "agent",
            "agent runs: a shared 1536-token tool description + a growing scratchpad",
            SLO(ttft_ms=1000, tpot_ms=100),
        ),
        _random("random", _RANDOM_DEFAULTS),
    ]
    return {workload.name: workload for workload in workloads}


WORKLOADS: dict[str, Workload] = _builtin_workloads()


def get_workload(name: str) -> Workload:
    """A workload by name; `random:in=N,out=M` (each N or LO-HI) sets random's lengths;
    `rag:documents=N,zipf=S` and `agent:systems=N,zipf=S` set how many shared prefixes
    there are and their Zipf popularity exponent."""
    if name in WORKLOADS:
        return WORKLOADS[name]
    base, has_params, _ = name.partition(":")
    if base == "random" and has_params:
        return parse_random(name)
    if base in _SHARED_COUNT and has_params:
        return parse_shared(name)
    choices = ", ".join(WORKLOADS)
    raise ConfigError(
        "workload",
        f"unknown workload {name!r}; choose one of {choices}, "
        "or random:in=N,out=M with N, M a length or a LO-HI range, "
        "or rag:documents=N,zipf=S / agent:systems=N,zipf=S",
    )


_SHARED_COUNT = {"rag": "num_documents", "agent": "num_systems"}  # the workload's field


def parse_shared(spec: str) -> Workload:
    """`rag:documents=64,zipf=1.1` or `agent:systems=16,zipf=0.8`: that many shared
    prefixes, picked with Zipf weights 1 / (i + 1) ** zipf; unset keys keep defaults."""
    base, _, params = spec.partition(":")
    count_key = "documents" if base == "rag" else "systems"
    changes: dict[str, Any] = {}
    for item in filter(str.strip, params.split(",")):
        key, has_value, value = (part.strip() for part in item.partition("="))
        field = {count_key: _SHARED_COUNT[base], "zipf": "popularity_exponent"}.get(key)
        if not has_value or field is None:
            raise ConfigError("workload", f"expected {count_key}=N or zipf=S in {spec!r}")
        if field in changes:
            raise ConfigError(f"workload.{key}", f"given twice in {spec!r}")
        try:
            number = int(value) if key == count_key else float(value)
        except ValueError:
            raise ConfigError(f"workload.{key}", f"not a number: {value!r}") from None
        if number < (1 if key == count_key else 0) or not math.isfinite(number):
            raise ConfigError(f"workload.{key}", f"out of range: {value!r}")
        changes[field] = number
    workload = dataclasses.replace(WORKLOADS[base], **changes)
    count = getattr(workload, _SHARED_COUNT[base])
    zipf = workload.popularity_exponent
    name = f"{base}:{count_key}={count},zipf={zipf:g}"
    description = f"{base} with {count} shared prefixes, Zipf popularity exponent {zipf:g}"
    return dataclasses.replace(workload, name=name, description=description)


def parse_random(spec: str) -> SingleTurnWorkload:
    """`random:in=512,out=128` or `random:in=128-1024,out=16-256`; unset keys keep defaults."""
    lengths = dict(_RANDOM_DEFAULTS)
    seen: set[str] = set()
    for item in filter(str.strip, spec.partition(":")[2].split(",")):
        key, has_value, value = (part.strip() for part in item.partition("="))
        if not has_value:
            raise ConfigError("workload", f"expected key=value in {spec!r}, got {item!r}")
        if key not in lengths:
            raise ConfigError("workload", f"unknown parameter {key!r} in {spec!r}; use in, out")
        if key in seen:
            raise ConfigError(f"workload.{key}", f"given twice in {spec!r}")
        seen.add(key)
        lengths[key] = _parse_length(f"workload.{key}", value)
    canonical = f"random:in={lengths['in']},out={lengths['out']}"
    return _random(canonical, lengths)


def _parse_length(field: str, value: str) -> Uniform:
    low_text, is_range, high_text = value.partition("-")
    try:
        low = int(low_text)
        high = int(high_text) if is_range else low
    except ValueError:
        raise ConfigError(
            field, f"expected a token count N or a range LO-HI, got {value!r}"
        ) from None
    if low < 1 or high < low:
        raise ConfigError(field, f"need 1 <= LO <= HI, got {value!r}")
    return Uniform(low, high)
