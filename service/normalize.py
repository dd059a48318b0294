"""Requests checked against the model's catalog entry and turned into the job's spec.

This is where model-dependent limits live: the model exists (404) and does the task (400); the
sampler is one of the model's; num_inference_steps ≤ T; class_label < number of classes; a prompt
only has words from the vocabulary (the message lists it); guidance needs a condition; images have
the model's size; latents the model's shape. Every failure is an `ApiError` naming the field. The
result is a `ddserve.spec` job spec: every default applied from the model's card (here, and only
here), a seed always drawn, the prompt tokenized once, images in canonical PNG.
"""

from __future__ import annotations

import math
import secrets
from typing import Any

from ddserve.params import (
    KARRAS_SAMPLERS,
    NO_GUIDANCE,
    ORDER_SAMPLERS,
    REPAINT_SAMPLERS,
)
from ddserve.requests import (
    DecodeBody,
    EncodeBody,
    GenerateBody,
    Img2ImgBody,
    InpaintBody,
    ReconstructBody,
    SamplingBody,
)
from ddserve.settings import Settings
from ddserve.spec import (
    DecodeSpec,
    EncodeSpec,
    GenerateSpec,
    Img2ImgSpec,
    InpaintSpec,
    PriorSampleSpec,
    ReconstructSpec,
)
from models.catalog import ModelEntry, SamplingDefaults, encodes_own_prompts
from models.data.text import encode_prompt, null_tokens, tokenize
from models.diffusers_format.entries import INPAINTING_UNET
from service import nested
from service.errors import ApiError
from service.uploads import (
    UploadLimits,
    canonical_image,
    canonical_mask,
    decode_base64,
    png_size,
)

RANDOM_SEED_BOUND = 2**31  # seeds the gateway draws stay small enough to read and retype
DEFAULT_MAX_IMAGE_SIDE: int = Settings.model_fields["max_image_side"].default


def _invalid(code: str, message: str, param: str) -> ApiError:
    return ApiError(422, code, message, param)


def _check_strength(strength: float, steps: int) -> None:
    """At least one step of the plan's tail must remain (`/img2img`, an inpainting UNet's
    `/inpaint`): the library's `timesteps.sdedit_start` arithmetic, ⌊steps·strength⌋ ≥ 1."""
    if int(steps * strength) == 0:
        raise _invalid(
            "strength_too_low",
            f"strength {strength} of {steps} steps leaves no denoising step "
            f"(⌊num_inference_steps·strength⌋ = 0): use strength ≥ {1 / steps:.4g} or more steps",
            "strength",
        )


class RequestNormalizer:
    """Validates bodies against `catalog` (name → entry); `served` limits which models take jobs."""

    def __init__(
        self,
        catalog: dict[str, ModelEntry],
        served: set[str],
        limits: UploadLimits,
        max_image_side: int = DEFAULT_MAX_IMAGE_SIDE,
    ) -> None:
        self.catalog = catalog
        self.served = served
        self.limits = limits
        self.max_image_side = max_image_side  # `Settings.max_image_side`

    # --- common checks ---

    def entry(self, name: str, task: str) -> ModelEntry:
        entry = self.catalog.get(name)
        if entry is None or name not in self.served:
            known = ", ".join(sorted(self.served)) or "none"
            raise ApiError(
                404, "model_not_found", f"unknown model {name!r}; served: {known}", "model"
            )
        if task not in entry.tasks:
            does = ", ".join(entry.tasks) or "nothing (it is a helper model)"
            raise ApiError(
                400,
                "unsupported_task",
                f"model {name!r} cannot {task}; it does: {does}",
                "model",
            )
        return entry

    @staticmethod
    def _defaults(entry: ModelEntry) -> SamplingDefaults:
        return entry.defaults or SamplingDefaults()

    @staticmethod
    def _size(entry: ModelEntry) -> tuple[int, int]:
        return entry.image.width, entry.image.height

    def _image_size(
        self,
        entry: ModelEntry,
        height: int | None,
        width: int | None,
        source: str | None = None,
        subject: str | None = None,
    ) -> tuple[int, int]:
        """The (height, width) of the images a request asks for: the model's own size unless
        given. A model with a `size_multiple` (a diffusers pipeline: its network is convolutional
        and needs sides that its first stage and UNet divide, f · 2^(D − 1); its first stage
        alone: f) takes multiples of it up to `max_image_side` and `max_image_pixels` pixels (its
        own size always); another model makes its own size only. `source`: the input (an image,
        latents) whose size it is (the errors name it); `subject`: what the errors say of it
        (default "`source` is W×H")."""
        own_h, own_w = entry.image.height, entry.image.width
        size = (own_h if height is None else height, own_w if width is None else width)
        if size == (own_h, own_w):
            return size
        # An input image's errors name the image; a request's name the side at fault.
        prefix = f"{subject or f'{source} is {size[1]}×{size[0]}'}: " if source else ""
        divides = "its first stage and UNet divide" if entry.schedule else "the autoencoder divides"

        def param(side: str) -> str:
            return source or side

        multiple = entry.size_multiple
        if multiple is None:
            raise _invalid(
                "fixed_image_size",
                f"{prefix}model {entry.name!r} makes {own_w}×{own_h} images only (height {own_h}, "
                f"width {own_w}); leave height and width out",
                param("height" if size[0] != own_h else "width"),
            )
        for side, value, own in (("height", size[0], own_h), ("width", size[1], own_w)):
            if value % multiple:
                lower = max(multiple, value // multiple * multiple)
                raise _invalid(
                    "image_size_not_multiple",
                    f"{prefix}{side} {value} is not a multiple of {multiple}, model "
                    f"{entry.name!r}'s size_multiple ({divides} the sides by it): use {lower} or "
                    f"{lower + multiple}",
                    param(side),
                )
            if value > self.max_image_side and value != own:
                raise _invalid(
                    "image_size_too_large",
                    f"{prefix}{side} {value} is over this service's limit of "
                    f"{self.max_image_side} pixels a side (DDSERVE_MAX_IMAGE_SIDE; model "
                    f"{entry.name!r}'s own size {own_w}×{own_h} is always allowed)",
                    param(side),
                )
        if size[0] * size[1] > self.limits.max_image_pixels:
            raise _invalid(
                "image_size_too_large",
                f"{prefix}{size[1]}×{size[0]} is {size[0] * size[1]} pixels, over this service's "
                f"limit of {self.limits.max_image_pixels} (DDSERVE_MAX_IMAGE_PIXELS)",
                param("height" if size[0] != own_h else "width"),
            )
        return size

    def _input_size(self, entry: ModelEntry, image: str, param: str) -> tuple[int, int]:
        """(width, height) an input image must have (`canonical_image`'s order): the model's own,
        or for a model with a `size_multiple` the image's own when `/generate` would make it (an
        inpaint or img2img job then runs at that size)."""
        if entry.size_multiple is None:
            return self._size(entry)
        width, height = png_size(decode_base64(image, param, self.limits), param)
        self._image_size(entry, height, width, source=param)
        return width, height

    @staticmethod
    def _seed(seed: int | None) -> int:
        return seed if seed is not None else secrets.randbelow(RANDOM_SEED_BOUND)

    def _sampling(
        self,
        entry: ModelEntry,
        body: SamplingBody,
        default_sampler: str | None = None,
    ) -> dict[str, Any]:
        """The sampler, its step count and options: each the body's or the default (the card's,
        unless `default_sampler` replaces it). The solver options apply only to the samplers that
        take them: given for another sampler they are a 422; left out, the card's default fills
        them for those samplers and null for others."""
        d = self._defaults(entry)
        chosen = body.sampler or default_sampler or d.sampler
        if entry.samplers and chosen not in entry.samplers:
            raise _invalid(
                "unsupported_sampler",
                f"model {entry.name!r} offers the samplers {', '.join(entry.samplers)}",
                "sampler",
            )
        options: dict[str, Any] = {}
        for name, samplers, default in (
            ("use_karras_sigmas", KARRAS_SAMPLERS, d.use_karras_sigmas),
            ("solver_order", ORDER_SAMPLERS, d.solver_order),
        ):
            given = getattr(body, name)
            if chosen not in samplers:
                if given is not None:
                    raise _invalid(
                        "solver_option_not_applicable",
                        f"{name} applies to the samplers {', '.join(samplers)}, not to "
                        f"{chosen!r}: leave it out or choose one of those",
                        name,
                    )
                options[name] = None
            else:
                options[name] = given if given is not None else default
        total = entry.schedule.num_timesteps if entry.schedule else 1000
        # The multistep solvers lay out S + 1 points of the schedule and drop the last
        # (models.diffusion.timesteps.multistep_timesteps); Karras σ levels have no such bound.
        most = total - 1 if chosen in ORDER_SAMPLERS and not options["use_karras_sigmas"] else total
        steps = body.num_inference_steps
        count = steps if steps is not None else min(d.num_inference_steps, most)
        if count > most:
            raise _invalid(
                "too_many_steps",
                f"num_inference_steps is {count}; with sampler {chosen!r} model {entry.name!r} "
                f"(T = {total}) takes 1 to {most}",
                "num_inference_steps",
            )
        return {
            "sampler": chosen,
            "num_inference_steps": count,
            "eta": body.eta if body.eta is not None else d.eta,
            **options,
        }

    def _condition(
        self,
        entry: ModelEntry,
        class_label: int | None,
        prompt: str | None,
        guidance_scale: float | None,
        negative_prompt: str | None = None,
    ) -> dict[str, Any]:
        cond = entry.conditioning
        tokens: list[int] | None = None
        if class_label is not None and prompt is not None:
            raise _invalid(
                "conflicting_condition", "give class_label or prompt, not both", "prompt"
            )
        if class_label is not None:
            if cond is None or cond.type != "class" or not cond.classes:
                raise _invalid(
                    "not_class_conditional",
                    f"model {entry.name!r} takes no class_label"
                    + (" (it takes a prompt)" if cond and cond.type == "text" else ""),
                    "class_label",
                )
            if class_label >= len(cond.classes):
                listed = ", ".join(f"{i}={c}" for i, c in enumerate(cond.classes))
                raise _invalid(
                    "class_out_of_range",
                    f"class_label {class_label} is out of range for model {entry.name!r}: "
                    f"0 ≤ class_label < {len(cond.classes)} ({listed})",
                    "class_label",
                )
        if prompt is not None and not _own_tokenizer(entry):
            if cond is None or cond.type != "text" or not cond.vocabulary:
                raise _invalid(
                    "not_text_conditional",
                    f"model {entry.name!r} takes no prompt"
                    + (" (it takes a class_label)" if cond and cond.type == "class" else ""),
                    "prompt",
                )
            context_len = cond.context_len or len(cond.vocabulary)
            try:
                tokens = encode_prompt(prompt, cond.vocabulary, context_len)
            except ValueError as e:
                raise _invalid("invalid_prompt", str(e), "prompt") from None
        negative_tokens = self._negative_prompt(entry, prompt, negative_prompt)
        if cond is not None and cond.type == "class" and not cond.has_null:
            # A class-conditional network without a ∅ class (a diffusers UNet2DModel with
            # num_class_embeds) cannot sample without a label nor guide towards one.
            if class_label is None and prompt is None:
                raise _invalid(
                    "class_label_required",
                    f"model {entry.name!r} is class-conditional and has no unconditional mode: "
                    f"give a class_label, 0 ≤ class_label < {len(cond.classes or [])}",
                    "class_label",
                )
            if guidance_scale is not None and guidance_scale != NO_GUIDANCE:
                raise _invalid(
                    "guidance_unsupported",
                    f"model {entry.name!r} has no unconditional prediction to guide away from "
                    "(no ∅ class): classifier-free guidance needs one; use guidance_scale 1",
                    "guidance_scale",
                )
        conditioned = class_label is not None or prompt is not None
        if guidance_scale is not None and guidance_scale != NO_GUIDANCE and not conditioned:
            raise _invalid(
                "guidance_needs_condition",
                "classifier-free guidance mixes a conditional and an unconditional prediction: "
                "give a class_label or prompt, or guidance_scale 1 (none)",
                "guidance_scale",
            )
        if guidance_scale is None:
            guidance_scale = self._defaults(entry).guidance_scale if conditioned else NO_GUIDANCE
        if negative_prompt is not None and guidance_scale == NO_GUIDANCE:
            # diffusers ignores a negative prompt at s ≤ 1; here it would be silently dropped.
            raise _invalid(
                "negative_prompt_needs_guidance",
                "negative_prompt replaces the empty prompt in classifier-free guidance, which "
                f"guidance_scale 1 turns off (model {entry.name!r}'s default is "
                f"{self._defaults(entry).guidance_scale}): give guidance_scale > 1, or no "
                "negative_prompt",
                "negative_prompt",
            )
        return {
            "class_label": class_label,
            "prompt": prompt,
            "prompt_tokens": tokens,
            "negative_prompt": negative_prompt,
            "negative_prompt_tokens": negative_tokens,
            "guidance_scale": guidance_scale,
        }

    def _steering(self, entry: ModelEntry, body: SamplingBody) -> dict[str, Any]:
        """What every denoising spec takes alike from its body (`SamplingBody`): the model, n,
        the condition and its guidance (`_condition`), the card's clip_denoised, the seed (drawn
        here when left out, so the job's `input` shows it) and the output options."""
        return {
            "model": entry.name,
            "n": body.n,
            **self._condition(
                entry, body.class_label, body.prompt, body.guidance_scale, body.negative_prompt
            ),
            "clip_denoised": self._defaults(entry).clip_denoised,
            "seed": self._seed(body.seed),
            "output": body.output,
        }

    @staticmethod
    def _negative_prompt(
        entry: ModelEntry, prompt: str | None, negative_prompt: str | None
    ) -> list[int] | None:
        """The negative prompt's tokens (words of the vocabulary, like the prompt's; no words at
        all is the empty prompt ∅ itself), or None when there is none."""
        if negative_prompt is None:
            return None
        cond = entry.conditioning
        own = _own_tokenizer(entry)
        if cond is None or cond.type != "text" or not (cond.vocabulary or own):
            raise _invalid(
                "not_text_conditional",
                f"model {entry.name!r} takes no negative_prompt (it has no text conditioning)",
                "negative_prompt",
            )
        if not cond.negative_prompt:
            # The pipeline's own `__call__` has no negative prompt (LDMTextToImagePipeline):
            # refused rather than served as something diffusers cannot reproduce.
            raise _invalid(
                "negative_prompt_unsupported",
                f"model {entry.name!r} ({entry.pipeline or 'its pipeline'}) takes no "
                "negative_prompt: its pipeline guides away from the empty prompt only; leave "
                "negative_prompt out",
                "negative_prompt",
            )
        if prompt is None:
            raise _invalid(
                "negative_prompt_needs_prompt",
                "negative_prompt steers a prompted image away from it: give a prompt too",
                "negative_prompt",
            )
        if own or not cond.vocabulary:
            return None  # the worker encodes the text (and "" is its ∅ too)
        context_len = cond.context_len or len(cond.vocabulary)
        if not tokenize(negative_prompt):
            return null_tokens(context_len)
        try:
            return encode_prompt(negative_prompt, cond.vocabulary, context_len)
        except ValueError as e:
            raise _invalid("invalid_prompt", f"negative_prompt: {e}", "negative_prompt") from None

    def _classifier_scale(
        self, entry: ModelEntry, requested: float | None, class_label: int | None
    ) -> float:
        scale = requested if requested is not None else self._defaults(entry).classifier_scale
        if scale <= 0:
            return 0.0
        if class_label is None and requested is None:
            return 0.0  # a default classifier scale only applies to class-conditional requests
        # The model's lack of a classifier is the first thing to say: asking a text model for a
        # class_label would send the user the wrong way.
        if not entry.classifier or entry.classifier not in self.catalog:
            raise _invalid(
                "no_classifier",
                f"model {entry.name!r} has no noisy classifier for classifier guidance",
                "classifier_scale",
            )
        if class_label is None:
            raise _invalid(
                "classifier_guidance_needs_class",
                "classifier guidance steers towards a class: give a class_label",
                "classifier_scale",
            )
        return scale

    def _images(self, entry: ModelEntry, images: list[str], param: str) -> list[str]:
        """/encode's and /reconstruct's images: the model's own size, or for a model with a
        `size_multiple` (an imported first stage: its factor f) the first image's size when
        `/generate` could make it, shared by all of them (one job is one tensor)."""
        size = self._size(entry)
        if entry.size_multiple is not None:
            size = self._input_size(entry, images[0], f"{param}[0]")
            for i, text in enumerate(images[1:], start=1):
                other = png_size(decode_base64(text, f"{param}[{i}]", self.limits), f"{param}[{i}]")
                if other != size:
                    raise _invalid(
                        "wrong_image_size",
                        f"{param}[{i}] is {other[0]}×{other[1]} and {param}[0] {size[0]}×"
                        f"{size[1]}: one request's images share one size (send others in "
                        "another request)",
                        f"{param}[{i}]",
                    )
        return [
            canonical_image(text, f"{param}[{i}]", self.limits, size, entry.image.channels)
            for i, text in enumerate(images)
        ]

    # --- per route ---

    def generate(self, body: GenerateBody) -> GenerateSpec | PriorSampleSpec:
        entry = self.entry(body.model, "generate")
        height, width = self._image_size(entry, body.height, body.width)
        if entry.schedule is None:  # no diffusion: a VAE or AAE samples its prior, then decodes
            return self._prior_sample(entry, body)
        return GenerateSpec(
            height=height,
            width=width,
            **self._sampling(entry, body),
            **self._steering(entry, body),
            classifier_scale=self._classifier_scale(entry, body.classifier_scale, body.class_label),
        )

    def _prior_sample(self, entry: ModelEntry, body: GenerateBody) -> PriorSampleSpec:
        """`generate` on an autoencoder with a prior (VAE, AAE): z ~ N(0, I) of the latent shape,
        decoded. Only n, class_label (a conditional model), seed and output apply."""
        diffusion_only = {
            "sampler": body.sampler,
            "num_inference_steps": body.num_inference_steps,
            "eta": body.eta,
            "use_karras_sigmas": body.use_karras_sigmas,
            "solver_order": body.solver_order,
            "prompt": body.prompt,
            "negative_prompt": body.negative_prompt,
            "guidance_scale": None if body.guidance_scale == NO_GUIDANCE else body.guidance_scale,
            "classifier_scale": body.classifier_scale or None,
            "output.trajectory": body.output.trajectory or None,
            "output.preview_every": body.output.preview_every,
        }
        for name, value in diffusion_only.items():
            if value is not None:
                raise _invalid(
                    "not_a_diffusion_model",
                    f"model {entry.name!r} ({entry.kind}) samples its prior and decodes it: "
                    f"{name} does not apply",
                    name,
                )
        cond = self._condition(entry, body.class_label, None, None)
        return PriorSampleSpec(
            model=entry.name,
            n=body.n,
            class_label=cond["class_label"],
            seed=self._seed(body.seed),
            output=body.output,
        )

    def inpaint(self, body: InpaintBody) -> InpaintSpec:
        entry = self.entry(body.model, "inpaint")
        if body.strength is not None and not entry.network.get(INPAINTING_UNET):
            raise _invalid(
                "strength_unsupported",
                f"model {entry.name!r} inpaints with RePaint (known-region replacement from pure "
                "noise, as RePaintPipeline): strength applies to inpainting UNets only",
                "strength",
            )
        if entry.network.get(INPAINTING_UNET):
            for name in ("jump_length", "jump_n_sample"):
                if getattr(body, name) is not None:
                    raise _invalid(
                        "resampling_unsupported",
                        f"model {entry.name!r} inpaints with its own inpainting UNet (it reads the "
                        f"mask and the masked image), not with RePaint: {name} does not apply",
                        name,
                    )
        d = self._defaults(entry)
        jump_n_sample = body.jump_n_sample if body.jump_n_sample is not None else d.jump_n_sample
        default_sampler = None
        if jump_n_sample > 1 and body.sampler is None and d.sampler not in REPAINT_SAMPLERS:
            default_sampler = _resampling_sampler(entry)
        sampling = self._sampling(entry, body, default_sampler)
        steps = sampling["num_inference_steps"]
        if body.strength is not None:
            _check_strength(body.strength, steps)
        # The default jump is cut to the step count; an explicit one must fit.
        jump_length = (
            body.jump_length if body.jump_length is not None else min(d.jump_length, steps)
        )
        if jump_n_sample > 1 and sampling["sampler"] not in REPAINT_SAMPLERS:
            whose = "" if body.sampler is not None else f"model {entry.name!r}'s default "
            raise _invalid(
                "sampler_cannot_resample",
                f"{whose}sampler {sampling['sampler']!r} keeps a history of model outputs, which "
                f"RePaint's jumps back to more noise would invalidate: with jump_n_sample > 1 "
                f"give sampler, one of {', '.join(REPAINT_SAMPLERS)}",
                "sampler",
            )
        if jump_length > steps:
            raise _invalid(
                "jump_too_long",
                f"jump_length {jump_length} exceeds num_inference_steps {steps}",
                "jump_length",
            )
        size = self._input_size(entry, body.image, "image")
        return InpaintSpec(
            image=canonical_image(body.image, "image", self.limits, size, entry.image.channels),
            mask=canonical_mask(body.mask, "mask", self.limits, size),
            **sampling,
            jump_length=jump_length,
            jump_n_sample=jump_n_sample,
            strength=body.strength,
            **self._steering(entry, body),
        )

    def img2img(self, body: Img2ImgBody) -> Img2ImgSpec:
        """Image-to-image (SDEdit) on a diffusion model that generates: the image noised to the
        tail of the plan `strength` gives (⌊steps·strength⌋ steps, at least one), then denoised."""
        entry = self.entry(body.model, "generate")
        if entry.schedule is None:
            raise _invalid(
                "not_a_diffusion_model",
                f"model {entry.name!r} ({entry.kind}) has no diffusion schedule to noise and "
                "denoise an image along: image-to-image needs a diffusion model",
                "model",
            )
        sampling = self._sampling(entry, body)
        steps = sampling["num_inference_steps"]
        _check_strength(body.strength, steps)
        size = self._input_size(entry, body.image, "image")
        return Img2ImgSpec(
            image=canonical_image(body.image, "image", self.limits, size, entry.image.channels),
            strength=body.strength,
            **sampling,
            **self._steering(entry, body),
            classifier_scale=self._classifier_scale(entry, body.classifier_scale, body.class_label),
        )

    def encode(self, body: EncodeBody) -> EncodeSpec:
        entry = self.entry(body.model, "encode")
        return EncodeSpec(
            model=entry.name,
            images=self._images(entry, body.images, "images"),
            output=body.output,
        )

    def reconstruct(self, body: ReconstructBody) -> ReconstructSpec:
        entry = self.entry(body.model, "reconstruct")
        if body.noise is not None and body.noise.kind != "gaussian" and body.noise.amount > 1.0:
            raise _invalid(
                "invalid_noise_amount",
                f"{body.noise.kind} noise takes a pixel fraction in [0, 1]",
                "noise.amount",
            )
        return ReconstructSpec(
            model=entry.name,
            images=self._images(entry, body.images, "images"),
            noise=body.noise,
            seed=self._seed(body.seed),
            output=body.output,
        )

    def decode(self, body: DecodeBody) -> DecodeSpec:
        """Latents [n, *latent_shape] → images; for a VQ-VAE also code indices [n, *code_shape]
        (as `codes`, or as `latents` when their shape says so)."""
        entry = self.entry(body.model, "decode")
        if body.latents is not None and body.codes is not None:
            raise _invalid("conflicting_input", "give latents or codes, not both", "codes")
        latents: list[Any] | None = None
        codes: list[Any] | None = None
        if body.codes is not None:
            if entry.code_shape is None:
                raise _invalid(
                    "not_vector_quantized",
                    f"model {entry.name!r} takes latents, not codes",
                    "codes",
                )
            codes = self._check_codes(entry, body.codes, "codes")
        elif body.latents is None:
            wanted = f"latents [n, {', '.join(map(str, entry.latent_shape or []))}]"
            if entry.code_shape is not None:
                wanted += f" or codes [n, {', '.join(map(str, entry.code_shape))}]"
            raise _invalid("missing_field", f"give {wanted}", "latents")
        elif entry.code_shape is not None and self._are_codes(entry, body.latents):
            codes = self._check_codes(entry, body.latents, "latents")
        else:
            latents = self._check_latents(entry, body.latents)
        return DecodeSpec(model=entry.name, latents=latents, codes=codes, output=body.output)

    @staticmethod
    def _shape(value: Any, param: str) -> list[int] | None:
        """The shape of a rectangular nested list, else None (ragged); a 422 past nested.MAX_DEPTH
        (walked without recursion: a deep list was a RecursionError)."""
        try:
            return nested.shape(value)
        except nested.TooDeepError as exc:
            raise _invalid("nesting_too_deep", f"{param} is {exc}", param) from None

    def _are_codes(self, entry: ModelEntry, latents: list[Any]) -> bool:
        """A VQ-VAE's `latents` that are code indices: [n, *code_shape] (of rank 3, [n, h, w],
        for a model that takes other sizes)."""
        shape = self._shape(latents, "latents") or []
        if entry.size_multiple is not None:
            return len(shape) == 1 + len(entry.code_shape or [])
        return entry.latent_shape != entry.code_shape and shape[1:] == list(entry.code_shape or [])

    def _latent_grid(self, entry: ModelEntry, shape: list[int] | None, param: str) -> bool:
        """For a model that takes other sizes (`size_multiple`): whether `shape` [n, …, h, w] has
        a grid h × w (≥ 1 × 1) whose images f·h × f·w the model may make (else the 422s of
        `_image_size`, naming `param`). f: the first stage's factor, image side / latent side."""
        if shape is None or len(shape) < 3 or min(shape[-2:]) < 1 or not entry.latent_shape:
            return False
        factor = entry.latent_factor
        h, w = shape[-2:]
        subject = f"{param} of {h}×{w} positions decode to {factor * w}×{factor * h} images"
        self._image_size(entry, factor * h, factor * w, source=param, subject=subject)
        return True

    def _check_latents(self, entry: ModelEntry, latents: list[Any]) -> list[Any]:
        """[n, *latent_shape], or for a model that takes other sizes (`size_multiple`: an
        imported first stage) [n, c, h, w] of any grid h × w whose images f·h × f·w it makes."""
        expected = entry.latent_shape
        if expected is None:
            raise _invalid("no_latent_shape", f"model {entry.name!r} has no latent shape", "model")
        shape = self._shape(latents, "latents")
        if entry.size_multiple is not None:
            fits = shape is not None and len(shape) == len(expected) + 1
            fits = fits and shape[1] == expected[0] and self._latent_grid(entry, shape, "latents")
            f = entry.latent_factor
            wanted = f"[n, {expected[0]}, h, w] (any h × w; the images are {f}h × {f}w)"
        else:
            fits = shape is not None and shape[1:] == list(expected)
            wanted = f"[n, {', '.join(map(str, expected))}]"
        if not fits:
            raise _invalid(
                "wrong_latent_shape",
                f"latents must be {wanted} for model {entry.name!r}; "
                f"got {shape if shape is not None else 'a ragged list'}",
                "latents",
            )
        values = nested.flatten(latents)
        if not all(_is_number(v) and math.isfinite(v) and abs(v) <= 1e6 for v in values):
            raise _invalid(
                "invalid_latents", "latents must be finite numbers, |value| ≤ 1e6", "latents"
            )
        return nested.convert(latents, float)

    def _check_codes(self, entry: ModelEntry, codes: list[Any], param: str) -> list[Any]:
        expected = list(entry.code_shape or [])
        shape = self._shape(codes, param)
        if entry.size_multiple is not None:  # [n, h, w] of any grid whose images it makes
            fits = shape is not None and len(shape) == len(expected) + 1
            fits = fits and self._latent_grid(entry, shape, param)
            f = entry.latent_factor
            wanted = f"[n, h, w] (any h × w; the images are {f}h × {f}w)"
        else:
            fits = shape is not None and shape[1:] == expected
            wanted = f"[n, {', '.join(map(str, expected))}]"
        if not fits:
            raise _invalid(
                "wrong_code_shape",
                f"codes must be {wanted} for model {entry.name!r}; "
                f"got {shape if shape is not None else 'a ragged list'}",
                param,
            )
        size = entry.codebook_size or 0
        values = nested.flatten(codes)
        if not all(_is_number(v) and float(v).is_integer() and 0 <= v < size for v in values):
            raise _invalid(
                "code_out_of_range", f"code indices must be integers in [0, {size})", param
            )
        return nested.convert(codes, int)


def _resampling_sampler(entry: ModelEntry) -> str | None:
    """The sampler `/inpaint` runs RePaint's jumps with when the request names none and the card's
    default is a multistep solver (which cannot take them): DDIM — the update of diffusers'
    `RePaintScheduler`, with the request's η — or else the first of the model's samplers that can
    resample; None if it offers none (the request is then refused)."""
    preferred = ("ddim", *(name for name in REPAINT_SAMPLERS if name != "ddim"))
    offered = [name for name in preferred if not entry.samplers or name in entry.samplers]
    return offered[0] if offered else None


def _own_tokenizer(entry: ModelEntry) -> bool:
    """A text model whose worker tokenizes and encodes prompts itself (a diffusers pipeline's
    tokenizer and text encoder): the spec carries the prompt's text, no tokens. Its limits
    are the tokenizer's: a prompt past `context_len` tokens is truncated, as diffusers does."""
    return encodes_own_prompts(entry.conditioning)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
