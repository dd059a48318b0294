"""Text-conditioned latent diffusion in the `StableDiffusionPipeline` and `LDMTextToImagePipeline`
layouts, served by ddserve's own batched sampler: the prompt encoders, the cross-attention UNet's
adapter, the latent decode.

A pipeline folder holds `tokenizer/` (a `CLIPTokenizer`), `text_encoder/` (a `CLIPTextModel`),
`unet/` (a `UNet2DConditionModel`), `vae/` (an `AutoencoderKL`) and `scheduler/`. As in the
pipeline's `encode_prompt` (Rombach et al. 2022, §3.3; CLIP of Radford et al. 2021):

    c = τ_θ(y) = CLIPTextModel(tokenize(y, padded to L = model_max_length)).last_hidden_state  [L, D]

and the UNet attends to c through cross-attention in its `CrossAttn*` blocks. Classifier-free
guidance (Ho & Salimans 2022) mixes the prediction for c with the one for the unconditional row
∅' = τ_θ(negative prompt), or τ_θ("") without one, exactly as the pipeline does:

    ε̃ = ε(z_t, t, ∅') + s · (ε(z_t, t, c) − ε(z_t, t, ∅'))

Here c and ∅' are each sample's own rows of a `DenoisingBatch` (`Sample.cond`, `Sample.uncond`),
so samples with different prompts, negative prompts and guidance scales share one UNet call.

`LDMTextToImagePipeline` is the same with `bert/` (an `LDMBertModel`, Rombach et al. 2022 §4.3.1)
and a BERT tokenizer in place of CLIP's, L fixed at 77 and c = `bert(input_ids)[0]`
(`LDMBertPromptEncoder`); `PROMPT_ENCODERS` picks the encoder of a model's `Conditioning.tokenizer`.

`PromptEncoder` keeps the encoder outputs of recent prompts (an LRU of `cache_size` entries), so a
repeated prompt — and the empty prompt of every unguided-by-a-negative sample — costs no
text-encoder call. A worker calls it from two threads (the stepping thread for prompts already
cached, its prepare thread for the others: `workers.engine.PrepareThread`), so the cache is read and
written under a lock; the encoder's forward runs outside it, so a cache hit never waits for an
encoding under way. The image is D(z / scaling_factor + shift_factor) (`decode_latents`).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Self

import torch
from torch import nn

log = logging.getLogger(__name__)

EMPTY_PROMPT = ""  # the pipeline's unconditional prompt when no negative prompt is given


class PromptEncoder:
    """τ_θ: prompts → conditioning rows [L, D] (`last_hidden_state`), with an LRU cache.

    `tokenizer` and `text_encoder` are a `CLIPTokenizer` and a `CLIPTextModel` (or any pair with
    their call signatures). Rows are kept on the text encoder's device, in its dtype."""

    def __init__(self, tokenizer: Any, text_encoder: nn.Module, cache_size: int = 128) -> None:
        if cache_size < 0:
            raise ValueError(f"cache_size must be ≥ 0, got {cache_size}")
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.cache_size = cache_size
        self.encoder_calls = 0  # network calls made (a batch of missed prompts is one call)
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        # ∅ is kept apart from the LRU and never evicted, so "" is always the very row every
        # unguided-by-a-negative sample uses (an exact ∅, whatever else was encoded with it).
        self._null: torch.Tensor | None = None
        # Guards _cache, _null and encoder_calls (the stepping thread and the prepare thread);
        # never held during an encoder call.
        self._lock = threading.Lock()

    ENCODER_FOLDER = "text_encoder"  # the text encoder's component folder in the pipeline

    @classmethod
    def from_folder(
        cls,
        folder: Path,
        device: torch.device | str = "cpu",
        cache_size: int = 128,
    ) -> Self:
        """The pipeline's own tokenizer (`tokenizer/`) and text encoder (`ENCODER_FOLDER`), the
        encoder in fp32, eval mode, on `device`."""
        tokenizer, encoder = cls.load_parts(folder / "tokenizer", folder / cls.ENCODER_FOLDER)
        return cls(tokenizer, encoder.to(device).eval().requires_grad_(False), cache_size)

    @staticmethod
    def load_parts(tokenizer: Path, encoder: Path) -> tuple[Any, nn.Module]:
        """A `CLIPTokenizer` and a `CLIPTextModel` from their folders."""
        from transformers import CLIPTextModel, CLIPTokenizer

        return CLIPTokenizer.from_pretrained(tokenizer), CLIPTextModel.from_pretrained(encoder)

    @property
    def context_len(self) -> int:
        """L: every prompt is padded (or truncated) to the tokenizer's `model_max_length`."""
        return int(self.tokenizer.model_max_length)

    @property
    def device(self) -> torch.device:
        return next(self.text_encoder.parameters()).device

    def __len__(self) -> int:
        with self._lock:
            return len(self._cache)

    def null_condition(self) -> torch.Tensor:
        """∅ = τ_θ(""), [L, D]: the unconditional row of a sample without a negative prompt;
        encoded alone, once (should two threads both encode it, the first row kept is ∅)."""
        with self._lock:
            if self._null is not None:
                return self._null
        row = self._encode([EMPTY_PROMPT])[0].clone()
        with self._lock:
            if self._null is None:
                self._null = row
            return self._null

    def cached(self, prompts: Sequence[str]) -> bool:
        """Whether `rows(prompts)` would find every row at hand (no text-encoder call). It does not
        touch the LRU order; a row may still be evicted before `rows` runs (then `rows` encodes)."""
        with self._lock:
            return all(
                self._null is not None if prompt == EMPTY_PROMPT else prompt in self._cache
                for prompt in prompts
            )

    def rows(self, prompts: Sequence[str]) -> list[torch.Tensor]:
        """τ_θ(y) [L, D] for each prompt; the prompts not in the cache are encoded in one call
        ("" is ∅ itself, `null_condition`)."""
        found: dict[str, torch.Tensor] = {}
        if EMPTY_PROMPT in prompts:
            found[EMPTY_PROMPT] = self.null_condition()
        with self._lock:
            for prompt in prompts:
                if prompt in found:
                    continue
                row = self._cache.get(prompt)
                if row is not None:
                    self._cache.move_to_end(prompt)
                    found[prompt] = row
        missing = list(dict.fromkeys(p for p in prompts if p not in found))
        if missing:
            encoded = self._encode(missing)  # [M, L, D], outside the lock
            with self._lock:
                for prompt, row in zip(missing, encoded, strict=True):
                    found[prompt] = row = row.clone()  # alone: a kept row must not hold the batch
                    self._remember(prompt, row)
        return [found[prompt] for prompt in prompts]

    def _remember(self, prompt: str, row: torch.Tensor) -> None:
        """Keep a row (the caller holds the lock)."""
        if self.cache_size == 0:
            return
        self._cache[prompt] = row
        self._cache.move_to_end(prompt)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> torch.Tensor:
        """`StableDiffusionPipeline.encode_prompt` without clip_skip: ids padded to L, the
        attention mask only where the encoder's config asks for one, `last_hidden_state`."""
        tokens = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.context_len,
            truncation=True,
            return_tensors="pt",
        )
        self._warn_if_cut(prompts)
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = tokens.attention_mask.to(self.device)
        with self._lock:
            self.encoder_calls += 1
        output = self.text_encoder(tokens.input_ids.to(self.device), attention_mask=mask)
        return output[0]  # [N, L, D]

    def _warn_if_cut(self, prompts: list[str]) -> None:
        """Log the prompts the tokenizer cuts at L tokens (the pipeline warns likewise): the
        words past the limit do not condition the image."""
        for prompt in prompts:
            count = len(self.tokenizer(prompt, truncation=False).input_ids)
            if count > self.context_len:
                log.warning(
                    "prompt of %d tokens cut to the text encoder's %d: %r",
                    count,
                    self.context_len,
                    prompt[:80],
                )


LDMBERT_CONTEXT_LEN = 77  # LDMTextToImagePipeline's max_length (LDMBert's max_position_embeddings)


class LDMBertPromptEncoder(PromptEncoder):
    """τ_θ of `LDMTextToImagePipeline` (Rombach et al. 2022, §4.3.1: a transformer encoder trained
    jointly with the LDM, "LDMBert"), with `PromptEncoder`'s interface and LRU cache. As the
    pipeline's `__call__` does:

        c = LDMBertModel(BertTokenizer(y, padding="max_length", max_length=77, truncation=True))[0]

    with no attention mask (the padding tokens are attended to, as in training), [77, D]; ∅ is the
    same of "" ([CLS] [SEP] and padding). L is the pipeline's fixed 77, not the tokenizer's
    `model_max_length` (a saved BertTokenizer's is unbounded)."""

    ENCODER_FOLDER = "bert"

    @staticmethod
    def load_parts(tokenizer: Path, encoder: Path) -> tuple[Any, nn.Module]:
        """A `BertTokenizer` and the pipeline's `LDMBertModel` from their folders."""
        from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertModel
        from transformers import BertTokenizer

        return BertTokenizer.from_pretrained(tokenizer), LDMBertModel.from_pretrained(encoder)

    @property
    def context_len(self) -> int:
        return LDMBERT_CONTEXT_LEN


# `Conditioning.tokenizer` → the prompt encoder of that pipeline layout (`entries.TEXT_LAYOUTS`).
PROMPT_ENCODERS: dict[str, type[PromptEncoder]] = {
    "clip": PromptEncoder,
    "bert": LDMBertPromptEncoder,
}


class CrossAttentionUNet(nn.Module):
    """A diffusers `UNet2DConditionModel` as a ddserve network: (z [N, C, h, w], t [N] long,
    cond [N, L, D] encoder hidden states) → its prediction [N, C, h, w] (ε, v or x_0, as the
    scheduler's `prediction_type` says). cond is the text encoder's output, not token ids: the
    worker encodes each prompt once (`PromptEncoder`) and the rows travel in the batch."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        if cond is None:
            raise ValueError("a text-conditioned UNet needs encoder hidden states on every row")
        cond = cond.to(dtype=x.dtype)  # the rows are float32; a half-precision UNet wants its own
        return self.unet(x, t, encoder_hidden_states=cond, return_dict=False)[0]


def load_cross_attention_unet(
    folder: Path, device: torch.device | str = "cpu", subfolder: str = "unet"
) -> CrossAttentionUNet:
    """The pipeline's `UNet2DConditionModel` (fp32, eval, on `device`), wrapped."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(
        folder, subfolder=subfolder, low_cpu_mem_usage=False
    )
    return CrossAttentionUNet(unet).to(device).eval().requires_grad_(False)


@torch.no_grad()
def decode_latents(
    vae: nn.Module,
    latents: torch.Tensor,  # [N, C, h, w] the sampler's z_0
    scaling_factor: float,
    shift_factor: float | None = None,
) -> torch.Tensor:
    """Images [N, 3, H, W] in [−1, 1] (unclamped) from latents z = s·(E(x) − b):
    D(z / s + b), with s = `scaling_factor` (Rombach et al. 2022, §4.3.2) and b = `shift_factor`
    (0 when the autoencoder's config has none), as the pipeline's `vae.decode` step does."""
    z = latents / scaling_factor
    if shift_factor:
        z = z + shift_factor
    return vae.decode(z, return_dict=False)[0]
