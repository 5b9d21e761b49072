"""What vLLM's own chat path makes of the fidelity conversations, for the engine tests to compare with.

Run in a subprocess (`python -m tests.engine.vllm_reference --model DIR --out FILE`) so that its
offline `LLM` is gone before the tests start their `AsyncLLM`: one engine at a time on this CPU.
Writes, per conversation, the prompt token ids of vLLM's chat rendering with `tokenizer_mode=mistral`
and, where the model can run it, the greedy output token ids of `LLM.chat`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from tests.engine.vllm_env import configure_vllm_env


def as_vllm_loads_images(messages: list[dict[str, Any]]) -> list[Any]:
    """`messages` with each data: URL image as vLLM's image loader hands it to the model's processor
    (`normalize_image`: EXIF orientation applied), re-encoded as PNG.

    vLLM's renderer counts image tokens on the caller's bytes as they are stored, and its Pixtral
    processor places the pixels after its loader turned them upright: for an image with a sideways
    EXIF orientation the two disagree. The processor's count is the one the model runs with.
    """
    from vllm.multimodal.image import normalize_image

    from tests.engine.conversations import with_images_as

    return with_images_as(messages, normalize_image)


def chat_prompt_ids(tokenizer_dir: str, conversations: list[Any]) -> dict[str, list[int]]:
    """vLLM's renderer step (`MistralRenderer` → `MistralTokenizer.apply_chat_template`), no model needed."""
    from vllm.tokenizers.mistral import MistralTokenizer

    tokenizer = MistralTokenizer.from_pretrained(tokenizer_dir)
    return {
        c.name: list(
            tokenizer.apply_chat_template(
                as_vllm_loads_images(c.openai_messages),
                tools=c.openai_tools,
                add_generation_prompt=not c.continue_final_message,
                continue_final_message=c.continue_final_message,
            )
        )
        for c in conversations
    }


def greedy_outputs(model_dir: str, conversations: list[Any], max_model_len: int) -> dict[str, dict[str, Any]]:
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=model_dir,
        tokenizer_mode="mistral",
        config_format="mistral",
        load_format="mistral",
        max_model_len=max_model_len,
        kv_cache_memory_bytes=256 << 20,
        enforce_eager=True,
        distributed_executor_backend="uni",
        limit_mm_per_prompt={"image": 10},
        seed=0,
    )
    results: dict[str, dict[str, Any]] = {}
    for c in conversations:
        (out,) = llm.chat(
            # As its loader turns them (see as_vllm_loads_images): vLLM's own renderer and processor
            # disagree on an image with a sideways EXIF orientation, and `LLM.chat` then fails.
            as_vllm_loads_images(c.openai_messages),
            SamplingParams(temperature=0.0, max_tokens=c.max_tokens),
            use_tqdm=False,
            tools=c.openai_tools,
            add_generation_prompt=not c.continue_final_message,
            continue_final_message=c.continue_final_message,
        )
        results[c.name] = {
            "prompt_token_ids": list(out.prompt_token_ids or []),
            "token_ids": list(out.outputs[0].token_ids),
            "text": out.outputs[0].text,
        }
    results[LOGPROBS_RUN] = sampled_logprobs(llm, results["text"]["prompt_token_ids"])
    llm.llm_engine.engine_core.shutdown()
    return results


# The sampled run whose logprobs the engine tests compare with: the text conversation's prompt.
LOGPROBS_RUN = "sampled-logprobs"
LOGPROBS_SAMPLING: dict[str, Any] = {"temperature": 1.0, "seed": 1234, "max_tokens": 8, "logprobs": 5}


def sampled_logprobs(llm: Any, prompt_ids: list[int]) -> dict[str, Any]:
    """`LLM.generate` on `prompt_ids` with `LOGPROBS_SAMPLING`: its tokens and each position's
    {token id: [logprob, rank]} as vLLM reports them."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    (out,) = llm.generate(
        TokensPrompt(prompt_token_ids=prompt_ids), SamplingParams(**LOGPROBS_SAMPLING), use_tqdm=False
    )
    completion = out.outputs[0]
    return {
        "token_ids": list(completion.token_ids),
        "logprobs": [
            {str(tid): [lp.logprob, lp.rank] for tid, lp in position.items()}
            for position in completion.logprobs or []
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True, help="the tiny model vLLM runs here")
    parser.add_argument("--tokenizer", required=True, help="a model folder whose tokenizer has images")
    parser.add_argument("--vision", action="store_true", help="the model can run image requests")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    configure_vllm_env()
    from tests.engine.conversations import all_conversations

    conversations = all_conversations()
    runnable = [c for c in conversations if args.vision or not c.needs_vision]
    report = {
        "chat_prompt_ids": chat_prompt_ids(args.tokenizer, conversations),
        "greedy": greedy_outputs(args.model, runnable, args.max_model_len),
    }
    args.out.write_text(json.dumps(report))


if __name__ == "__main__":
    main()
