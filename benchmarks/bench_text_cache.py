"""What the prompt encoder's cache saves: a text-encoder call against a cache hit, side by side.

A text pipeline's worker turns each job's prompt (and negative prompt) into conditioning rows with
the pipeline's CLIP text encoder (`models.diffusers_format.text.PromptEncoder`); repeated prompts
come from its LRU instead. This times, alternating in one run, `rows([prompt])` for prompts never
seen (a miss: tokenizer + text encoder) and for a cached one (a hit), on a `CLIPTextModel` of SD
1.x's text encoder's shape (12 layers, width 768, 77 tokens; random weights; 85 M parameters with
this small vocabulary — SD's 49,408-token embedding adds 38 M that a forward pass only indexes)
and, for scale, one call of an SD-1.x-shaped UNet at reduced width on 4×64×64 latents with a
batch of 2 rows (one guided sample).

    .venv/bin/python -m benchmarks.bench_text_cache [--rounds 10]

Writes benchmarks/results/text_cache.json. Not a test: run it by hand, with the machine to itself.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def sd_text_encoder(folder: Path) -> tuple[object, torch.nn.Module]:
    """A CLIP tokenizer (tests/tiny_sd.py's local vocabulary) and an SD-1.x-shaped text encoder."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from tests.tiny_sd import write_tokenizer_files

    write_tokenizer_files(folder)
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return tokenizer, CLIPTextModel(config).eval()


def sd_unet() -> torch.nn.Module:
    """SD 1.x's UNet2DConditionModel layout at reduced width (cross-attention 768)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=64,
        block_out_channels=(64, 128, 256, 256),
        cross_attention_dim=768,
        attention_head_dim=8,
    ).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    from models.diffusers_format.text import CrossAttentionUNet, PromptEncoder

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer, text_encoder = sd_text_encoder(Path(tmp))
    encoder = PromptEncoder(tokenizer, text_encoder, cache_size=1024)
    parameters = sum(p.numel() for p in text_encoder.parameters())
    unet = CrossAttentionUNet(sd_unet())
    cached = "a photo of a red cat"
    with torch.no_grad():
        encoder.rows([cached])  # warm: the hit below finds it
        x = torch.randn(2, 4, 64, 64)
        t = torch.tensor([500, 500])
        cond = torch.stack(encoder.rows([cached, ""]))  # [2, 77, 768]
        unet(x, t, cond)  # warm
        miss, hit, step = [], [], []
        for i in range(args.rounds):
            started = time.perf_counter()
            encoder.rows([f"a photo of {i} red dog"])  # never seen: a text-encoder call
            miss.append(time.perf_counter() - started)
            started = time.perf_counter()
            encoder.rows([cached])  # cached: no call
            hit.append(time.perf_counter() - started)
            started = time.perf_counter()
            unet(x, t, cond)
            step.append(time.perf_counter() - started)
    result = {
        "text_encoder_parameters": parameters,
        "torch_threads": torch.get_num_threads(),
        "rounds": args.rounds,
        "miss_ms_median": 1e3 * statistics.median(miss),
        "hit_ms_median": 1e3 * statistics.median(hit),
        "unet_step_2_rows_ms_median": 1e3 * statistics.median(step),
        "encoder_calls": encoder.encoder_calls,
    }
    result["miss_over_hit"] = result["miss_ms_median"] / result["hit_ms_median"]
    result["miss_over_unet_step"] = result["miss_ms_median"] / result["unet_step_2_rows_ms_median"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "text_cache.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
