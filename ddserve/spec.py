"""The job spec: what a worker runs, fully resolved, typed and validated once on each side.

The gateway builds one spec per accepted request (`service.normalize`: every default applied from the
model's card, a seed always drawn, the prompt tokenized, images re-encoded as canonical PNG). Redis
carries its JSON form (`spec.model_dump(mode="json", by_alias=True)`, the RQ job's `request`
argument, also shown as the job's `input`); the worker parses it once when it takes the job
(`parse_job_spec`). A spec that does not parse fails its own job with `InvalidJobSpec`'s message;
nothing on the worker side reads a parameter with a fallback default.

Kinds (`ddserve.jobs.JobKind`): `generate` on a diffusion model (`GenerateSpec`) or on an
autoencoder with a prior — VAE, AAE — (`PriorSampleSpec`: z_i ~ N(0, I) decoded; told apart by the
absence of sampling fields), `inpaint`, `img2img`, `encode`, `decode`, `reconstruct`.

Torch-free: the gateway imports it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    ValidationError,
    model_validator,
)

from ddserve.params import (
    KARRAS_SAMPLERS,
    NO_GUIDANCE,
    ORDER_SAMPLERS,
    ClassifierScale,
    ClassLabel,
    Eta,
    GuidanceScale,
    ImageCount,
    ImageHeight,
    ImageList,
    ImagePng,
    ImageWidth,
    InferenceSteps,
    JumpLength,
    JumpNSample,
    MaskPng,
    ModelName,
    NegativePrompt,
    Prompt,
    PromptTokens,
    SamplerName,
    Seed,
    SolverOrder,
    Strength,
    UseKarrasSigmas,
)
from ddserve.requests import NoiseOptions, OutputOptions

_SPEC_CONFIG = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, allow_inf_nan=False)


class InvalidJobSpec(ValueError):
    """A job's spec does not parse: the job fails with this message, the worker goes on."""


class _Spec(BaseModel):
    model_config = _SPEC_CONFIG

    model: ModelName
    output: OutputOptions = Field(default_factory=OutputOptions)

    def to_json(self) -> dict[str, Any]:
        """The form Redis carries and the job's `input` shows."""
        return self.model_dump(mode="json", by_alias=True)


class _Conditioned(_Spec):
    class_label: ClassLabel | None = None
    prompt: Prompt | None = None
    # Tokenized once, by the gateway, for models of word vocabularies; None for a model with its
    # own tokenizer (`models.catalog.encodes_own_prompts`), whose worker encodes the prompt's text.
    prompt_tokens: PromptTokens | None = None
    negative_prompt: NegativePrompt | None = None  # the unconditional row's prompt (∅ if None)
    negative_prompt_tokens: PromptTokens | None = None  # tokenized like the prompt
    guidance_scale: GuidanceScale = NO_GUIDANCE  # s, diffusers' meaning (ddserve.params)

    @model_validator(mode="after")
    def _one_condition(self) -> _Conditioned:
        if self.class_label is not None and self.prompt is not None:
            raise ValueError("give class_label or prompt, not both")
        if self.prompt is None and self.prompt_tokens is not None:
            raise ValueError("prompt_tokens without a prompt (the gateway tokenizes the prompt)")
        if self.guided and self.class_label is None and self.prompt is None:
            raise ValueError("classifier-free guidance (guidance_scale > 1) needs a condition")
        if (self.negative_prompt_tokens is None) != (
            self.negative_prompt is None or self.prompt_tokens is None
        ):
            raise ValueError(
                "negative_prompt_tokens go with a negative_prompt, tokenized as the prompt is"
            )
        if self.negative_prompt is not None and (self.prompt is None or not self.guided):
            raise ValueError("negative_prompt needs a prompt and guidance_scale > 1")
        return self

    @property
    def guided(self) -> bool:
        """Classifier-free guidance is on: the sample takes a second, unconditional row."""
        return self.guidance_scale != NO_GUIDANCE


class _Sampling(_Conditioned):
    n: ImageCount
    sampler: SamplerName
    num_inference_steps: InferenceSteps
    eta: Eta
    # Present exactly for the samplers they apply to (null otherwise), as the gateway resolves them.
    use_karras_sigmas: UseKarrasSigmas | None = None
    solver_order: SolverOrder | None = None
    clip_denoised: bool
    seed: Seed

    @model_validator(mode="after")
    def _solver_options_match_the_sampler(self) -> _Sampling:
        for name, samplers in (
            ("use_karras_sigmas", KARRAS_SAMPLERS),
            ("solver_order", ORDER_SAMPLERS),
        ):
            given = getattr(self, name) is not None
            if given and self.sampler not in samplers:
                raise ValueError(f"{name} applies to {', '.join(samplers)}, not {self.sampler!r}")
            if not given and self.sampler in samplers:
                raise ValueError(f"{name} is missing: sampler {self.sampler!r} takes it")
        return self


class _ClassifierGuided(_Sampling):
    classifier_scale: ClassifierScale = 0.0

    @model_validator(mode="after")
    def _classifier_needs_class(self) -> _ClassifierGuided:
        if self.classifier_scale > 0 and self.class_label is None:
            raise ValueError("classifier_scale needs a class_label")
        return self


class GenerateSpec(_ClassifierGuided):
    kind: Literal["generate"] = "generate"
    # The images' size in pixels; the gateway always writes both (the model's own size when the
    # request gives none). None (a spec queued before sizes existed): the model's own size.
    height: ImageHeight | None = None
    width: ImageWidth | None = None

    @model_validator(mode="after")
    def _both_sides(self) -> GenerateSpec:
        if (self.height is None) != (self.width is None):
            raise ValueError("height and width go together")
        return self


class Img2ImgSpec(_ClassifierGuided):
    """Image-to-image (SDEdit): `image` noised to the tail of the plan that `strength` gives."""

    kind: Literal["img2img"] = "img2img"
    image: ImagePng  # canonical PNG of the model's image size and channels
    strength: Strength


class InpaintSpec(_Sampling):
    kind: Literal["inpaint"] = "inpaint"
    image: ImagePng  # canonical PNG of the model's size and channels
    mask: MaskPng  # canonical mode "L" PNG: 255 = keep, 0 = generate
    jump_length: JumpLength
    jump_n_sample: JumpNSample
    # An inpainting UNet's start from the image noised to the plan's tail (< 1); None = 1.
    strength: Strength | None = None


class PriorSampleSpec(_Spec):
    """`generate` on a VAE or AAE: image i decodes z_i ~ N(0, I) drawn from the stream (seed, i)."""

    kind: Literal["generate"] = "generate"
    n: ImageCount
    class_label: ClassLabel | None = None
    seed: Seed


class EncodeSpec(_Spec):
    kind: Literal["encode"] = "encode"
    images: ImageList


class DecodeSpec(_Spec):
    kind: Literal["decode"] = "decode"
    latents: list[Any] | None = None  # [n, *latent_shape] floats, checked by the gateway
    codes: list[Any] | None = None  # [n, *code_shape] int code indices (VQ-VAE)

    @model_validator(mode="after")
    def _one_input(self) -> DecodeSpec:
        if (self.latents is None) == (self.codes is None):
            raise ValueError("decode takes latents or codes (one of them)")
        return self


class ReconstructSpec(_Spec):
    kind: Literal["reconstruct"] = "reconstruct"
    images: ImageList
    noise: NoiseOptions | None = None
    seed: Seed  # the corruption noise of image i comes from the stream (seed, i)


SAMPLING_FIELDS = frozenset(GenerateSpec.model_fields) - frozenset(PriorSampleSpec.model_fields)


def _spec_tag(value: Any) -> str | None:
    """Which spec a JSON object is: its kind, and `prior_sample` for a generate with no sampler."""
    if isinstance(value, BaseModel):
        value = value.model_dump(by_alias=True)
    if not isinstance(value, dict):
        return None
    kind = value.get("kind")
    if kind == "generate" and not SAMPLING_FIELDS & value.keys():
        return "prior_sample"  # none of a diffusion spec's fields: a missing one is named instead
    return kind if isinstance(kind, str) else None


JobSpec = Annotated[
    Annotated[GenerateSpec, Tag("generate")]
    | Annotated[PriorSampleSpec, Tag("prior_sample")]
    | Annotated[InpaintSpec, Tag("inpaint")]
    | Annotated[Img2ImgSpec, Tag("img2img")]
    | Annotated[EncodeSpec, Tag("encode")]
    | Annotated[DecodeSpec, Tag("decode")]
    | Annotated[ReconstructSpec, Tag("reconstruct")],
    Discriminator(
        _spec_tag,
        custom_error_type="unknown_job_kind",
        custom_error_message="kind must be one of generate, inpaint, img2img, encode, decode, "
        "reconstruct",
    ),
]
DenoiseSpec = (
    GenerateSpec | InpaintSpec | Img2ImgSpec
)  # the kinds that run in a denoising running set

_ADAPTER: TypeAdapter[JobSpec] = TypeAdapter(JobSpec)
MAX_REPORTED_ERRORS = 5


def parse_job_spec(data: Any) -> JobSpec:
    """The spec of a job's `request` argument; `InvalidJobSpec` naming the bad fields if it does
    not parse."""
    try:
        return _ADAPTER.validate_python(data, strict=True)  # JSON types, as the bodies
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        shown = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'spec'}: {e['msg']}"
            for e in errors[:MAX_REPORTED_ERRORS]
        )
        more = len(errors) - MAX_REPORTED_ERRORS
        raise InvalidJobSpec(
            f"invalid job spec: {shown}" + (f" (and {more} more)" if more > 0 else "")
        ) from None
