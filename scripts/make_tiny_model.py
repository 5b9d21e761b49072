"""Build a tiny random-weight Mistral-Small-3.x style model, offline, in Mistral's native layout.

The folder holds what the real model's folder holds and what vLLM reads with
`tokenizer_mode=mistral, config_format=mistral, load_format=mistral`:

- `params.json`: the text decoder's shape and, unless `--text-only`, a `vision_encoder` with the
  Small-3.x image settings (patch 14, spatial merge 2, images up to 1540 px, patch-merge projector);
- `consolidated.safetensors`: random weights under the Mistral checkpoint names (`layers.0.attention.wq`,
  `vision_encoder.transformer.layers.0.feed_forward.w1`, ...), so the mistral weight loader is exercised;
- `tekken.json`: a v11 tekken tokenizer made from the BPE vocabulary that `mistral_common` ships,
  with the v11 special tokens (`[SYSTEM_PROMPT]`, `[TOOL_CALLS]`, `[ARGS]`, `[CALL_ID]`, ...) and, unless
  `--text-only`, the image config;
- `SYSTEM_PROMPT.txt`: a default system prompt with the `{name}`/`{today}`/`{yesterday}` fields.

Usage: python scripts/make_tiny_model.py --out .cache/tiny-model [--text-only]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

# Ranks 0-19 are the special tokens every tekken tokenizer starts with; v11 adds the tool-call
# tokens. Ranks not named here are filled with `<SPECIAL_n>` placeholders, as in the real file.
_SPECIAL_TOKENS: dict[int, str] = {
    0: "<unk>",
    1: "<s>",
    2: "</s>",
    3: "[INST]",
    4: "[/INST]",
    5: "[AVAILABLE_TOOLS]",
    6: "[/AVAILABLE_TOOLS]",
    7: "[TOOL_RESULTS]",
    8: "[/TOOL_RESULTS]",
    9: "[TOOL_CALLS]",
    10: "[IMG]",
    11: "<pad>",
    12: "[IMG_BREAK]",
    13: "[IMG_END]",
    14: "[PREFIX]",
    15: "[MIDDLE]",
    16: "[SUFFIX]",
    17: "[SYSTEM_PROMPT]",
    18: "[/SYSTEM_PROMPT]",
    19: "[TOOL_CONTENT]",
    32: "[ARGS]",
    33: "[CALL_ID]",
    34: "[THINK]",
    35: "[/THINK]",
}
NUM_SPECIAL_TOKENS = 1000
VOCAB_SIZE = 131072  # the real model's: 1000 special tokens + 130072 BPE tokens
IMAGE_TOKEN_ID, IMAGE_BREAK_TOKEN_ID, IMAGE_END_TOKEN_ID = 10, 12, 13

# Small enough to start in seconds on two CPU cores; head sizes are ones the CPU attention supports.
TEXT_ARGS: dict[str, Any] = {
    "dim": 64,
    "n_layers": 2,
    "head_dim": 32,
    "hidden_dim": 128,
    "n_heads": 2,
    "n_kv_heads": 1,  # grouped-query attention, as in the real model (32 heads, 8 KV heads)
    "rope_theta": 1000000000.0,
    "norm_eps": 1e-05,
    "vocab_size": VOCAB_SIZE,
    "max_position_embeddings": 131072,
}
VISION_ARGS: dict[str, Any] = {
    "hidden_size": 64,
    "num_channels": 3,
    "max_image_size": 1540,
    "image_size": 1540,
    "patch_size": 14,
    "rope_theta": 10000.0,
    "intermediate_size": 128,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "mm_projector_id": "patch_merge",
    "spatial_merge_size": 2,
    "add_pre_mm_projector_layer_norm": True,
    "adapter_bias": False,
    "image_token_id": IMAGE_TOKEN_ID,
    "image_break_token_id": IMAGE_BREAK_TOKEN_ID,
    "image_end_token_id": IMAGE_END_TOKEN_ID,
}
SYSTEM_PROMPT = (
    "You are {name}, a tiny random test model standing in for Mistral-Small-3.2.\n"
    "Today is {today}; yesterday was {yesterday}.\n"
)


def tekken_config(*, with_image: bool) -> dict[str, Any]:
    """The v11 tokenizer file, derived from the newest tekken vocabulary `mistral_common` ships."""
    import mistral_common

    source = Path(mistral_common.__file__).parent / "data" / "tekken_240911.json"
    base = json.loads(source.read_text())
    special = [
        {"rank": rank, "token_str": _SPECIAL_TOKENS.get(rank, f"<SPECIAL_{rank}>"), "is_control": True}
        for rank in range(NUM_SPECIAL_TOKENS)
    ]
    config = dict(base["config"])
    config.update(
        version="v11",
        default_vocab_size=VOCAB_SIZE,
        default_num_special_tokens=NUM_SPECIAL_TOKENS,
    )
    out: dict[str, Any] = {"config": config, "vocab": base["vocab"], "special_tokens": special}
    if with_image:
        out["image"] = {"image_patch_size": 14, "max_image_size": 1540, "spatial_merge_size": 2}
    return out


def random_weights(*, with_vision: bool, seed: int) -> dict[str, Any]:
    """Random bf16 weights under the names of Mistral's consolidated checkpoints."""
    import torch

    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, dtype=torch.bfloat16)

    t = TEXT_ARGS
    dim, hd, ffn = t["dim"], t["head_dim"], t["hidden_dim"]
    weights: dict[str, torch.Tensor] = {
        "tok_embeddings.weight": rand(VOCAB_SIZE, dim),
        "norm.weight": ones(dim),
        "output.weight": rand(VOCAB_SIZE, dim),
    }
    for i in range(t["n_layers"]):
        p = f"layers.{i}."
        weights |= {
            p + "attention.wq.weight": rand(t["n_heads"] * hd, dim),
            p + "attention.wk.weight": rand(t["n_kv_heads"] * hd, dim),
            p + "attention.wv.weight": rand(t["n_kv_heads"] * hd, dim),
            p + "attention.wo.weight": rand(dim, t["n_heads"] * hd),
            p + "attention_norm.weight": ones(dim),
            p + "ffn_norm.weight": ones(dim),
            p + "feed_forward.w1.weight": rand(ffn, dim),
            p + "feed_forward.w2.weight": rand(dim, ffn),
            p + "feed_forward.w3.weight": rand(ffn, dim),
        }
    if with_vision:
        v = VISION_ARGS
        vh, vffn, merge = v["hidden_size"], v["intermediate_size"], v["spatial_merge_size"]
        weights |= {
            "vision_encoder.patch_conv.weight": rand(vh, v["num_channels"], v["patch_size"], v["patch_size"]),
            "vision_encoder.ln_pre.weight": ones(vh),
            "pre_mm_projector_norm.weight": ones(vh),
            "patch_merger.merging_layer.weight": rand(vh, vh * merge * merge),
            "vision_language_adapter.w_in.weight": rand(dim, vh),
            "vision_language_adapter.w_out.weight": rand(dim, dim),
        }
        for i in range(v["num_hidden_layers"]):
            p = f"vision_encoder.transformer.layers.{i}."
            weights |= {
                p + "attention.wq.weight": rand(vh, vh),
                p + "attention.wk.weight": rand(vh, vh),
                p + "attention.wv.weight": rand(vh, vh),
                p + "attention.wo.weight": rand(vh, vh),
                p + "attention_norm.weight": ones(vh),
                p + "ffn_norm.weight": ones(vh),
                p + "feed_forward.w1.weight": rand(vffn, vh),
                p + "feed_forward.w2.weight": rand(vh, vffn),
                p + "feed_forward.w3.weight": rand(vffn, vh),
            }
    return weights


def build(out: Path, *, text_only: bool = False, seed: int = 0) -> Path:
    """Write the model into `out` (replacing it) and return `out`."""
    from safetensors.torch import save_file

    params = dict(TEXT_ARGS)
    if not text_only:
        params["vision_encoder"] = dict(VISION_ARGS)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename, so a half-written model is never mistaken for a built one.
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        tmp.chmod(0o755)
        (tmp / "params.json").write_text(json.dumps(params, indent=2) + "\n")
        (tmp / "tekken.json").write_text(json.dumps(tekken_config(with_image=not text_only)))
        (tmp / "SYSTEM_PROMPT.txt").write_text(SYSTEM_PROMPT)
        save_file(
            random_weights(with_vision=not text_only, seed=seed),
            str(tmp / "consolidated.safetensors"),
            metadata={"format": "pt"},
        )
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="folder to write the model into")
    parser.add_argument("--text-only", action="store_true", help="leave out the vision encoder")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = parser.parse_args(argv)
    path = build(args.out, text_only=args.text_only, seed=args.seed)
    print(f"tiny model written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
