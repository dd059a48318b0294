"""Each request parameter is declared once (`ddserve.params`); the HTTP bodies, the job specs, the
Python client's keyword arguments and the `ddserve generate` options must agree with it."""

from __future__ import annotations

import argparse
import json
from typing import Any

import httpx
import numpy as np
import pytest
from pydantic import BaseModel, ValidationError

from ddserve import generate as generate_cli
from ddserve import params
from ddserve.client import bodies
from ddserve.client.aio import AsyncClient
from ddserve.client.sync import Client
from ddserve.requests import (
    DecodeBody,
    EncodeBody,
    GenerateBody,
    Img2ImgBody,
    InpaintBody,
    ReconstructBody,
)
from ddserve.spec import GenerateSpec, Img2ImgSpec, InpaintSpec, ReconstructSpec

SAMPLE_VALUES = {
    "n": 3,
    "sampler": "ddpm",
    "num_inference_steps": 20,
    "eta": 0.5,
    "use_karras_sigmas": True,
    "solver_order": 1,
    "class_label": 2,
    "prompt": "red circle",
    "negative_prompt": "blue",
    "guidance_scale": 7.5,
    "classifier_scale": 1.0,
    "seed": 42,
    "jump_length": 5,
    "jump_n_sample": 2,
    "strength": 0.45,
    "height": 24,
    "width": 32,
}


def sent_bodies(call: Any) -> list[dict[str, Any]]:
    """The JSON bodies a client call sends (the gateway is a mock that answers 202)."""
    sent: list[dict[str, Any]] = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(json.loads(request.content))
        job = {"id": "j", "kind": "generate", "model": "m", "status": "queued", "input": {}}
        return httpx.Response(202, json=job)

    with Client(
        "http://ddserve.test", http=httpx.Client(transport=httpx.MockTransport(answer))
    ) as client:  # type: ignore[arg-type]
        call(client)
    return sent


@pytest.mark.parametrize(
    ("method", "body"),
    [("generate", GenerateBody), ("inpaint", InpaintBody), ("img2img", Img2ImgBody)],
)
def test_the_client_forwards_every_body_parameter_and_refuses_others(
    method: str, body: type[BaseModel]
) -> None:
    names = [n for n in body.model_fields if n in SAMPLE_VALUES]
    assert names, body
    values = {n: SAMPLE_VALUES[n] for n in names}
    images = (np.zeros((8, 8), np.uint8), np.full((8, 8), 255, np.uint8))
    args = {"inpaint": images, "img2img": images[:1]}.get(method, ())
    (sent,) = sent_bodies(lambda c: getattr(c, method)("m", *args, wait=False, **values))
    assert {n: sent[n] for n in names} == values
    body.model_validate(sent)  # what the client sends is a valid body
    with pytest.raises(TypeError, match="no field"):
        sent_bodies(lambda c: getattr(c, method)("m", *args, wait=False, guidance=3.0))
    for client in (Client, AsyncClient):
        doc = getattr(client, method).__doc__
        for name in names:
            assert f"{name}: " in doc, f"{client.__name__}.{method}'s doc lacks {name}"


def test_body_builders_produce_bodies_that_validate() -> None:
    body = bodies.generate_body("m", n=2, sampler="ddpm", guidance_scale=4.0, seed=1)
    assert GenerateBody.model_validate(body).guidance_scale == 4.0


def test_every_optional_body_field_carries_its_parameter_description() -> None:
    for body in (GenerateBody, InpaintBody, Img2ImgBody, EncodeBody, DecodeBody, ReconstructBody):
        for name, field in body.model_fields.items():
            assert field.description, f"{body.__name__}.{name} has no description"
        schema = body.model_json_schema()
        for name, prop in schema["properties"].items():
            assert prop.get("description") or "$ref" in prop or "allOf" in prop, (
                f"{body.__name__}.{name} has no description in the OpenAPI schema"
            )


LIMIT_KEYS = ("type", "minimum", "maximum", "minLength", "maxLength", "pattern", "enum", "items")


def declared(model: type[BaseModel], name: str) -> dict[str, Any]:
    """A field's description and limits from the model's JSON schema, whether it is optional
    (`anyOf` with null) or not."""
    prop = model.model_json_schema()["properties"][name]
    branch = next(b for b in prop.get("anyOf", [prop]) if b.get("type") != "null")
    found = {key: branch[key] for key in LIMIT_KEYS if key in branch}
    found["description"] = branch.get("description") or prop.get("description")
    return found


@pytest.mark.parametrize(
    ("body", "spec", "names"),
    [
        (
            GenerateBody,
            GenerateSpec,
            ["n", "num_inference_steps", "eta", "guidance_scale", "seed", "negative_prompt"],
        ),
        (GenerateBody, GenerateSpec, ["use_karras_sigmas", "solver_order"]),
        (GenerateBody, GenerateSpec, ["height", "width"]),
        (InpaintBody, InpaintSpec, ["jump_length", "jump_n_sample", "image", "mask", "strength"]),
        (InpaintBody, InpaintSpec, ["use_karras_sigmas", "solver_order"]),
        (ReconstructBody, ReconstructSpec, ["seed", "images"]),
        (
            Img2ImgBody,
            Img2ImgSpec,
            ["image", "strength", "n", "guidance_scale", "classifier_scale", "seed"],
        ),
    ],
)
def test_body_and_spec_share_one_declaration_of_each_parameter(
    body: type[BaseModel], spec: type[BaseModel], names: list[str]
) -> None:
    """The body's and the spec's field come from the same `ddserve.params` type: same
    description, same limits."""
    for name in names:
        assert declared(body, name) == declared(spec, name), name


def test_generate_cli_options_are_derived_from_the_body() -> None:
    parser = argparse.ArgumentParser()
    generate_cli.add_arguments(parser)
    for name in generate_cli.BODY_OPTIONS:
        assert name in GenerateBody.model_fields
    args = parser.parse_args(["--model", "m", "--steps", "20", "--guidance-scale", "7.5"])
    assert args.num_inference_steps == 20 and args.guidance_scale == 7.5
    help_text = parser.format_help()
    assert "as in diffusers" in help_text  # the guidance description, from ddserve.params
    words = " ".join(help_text.split())  # argparse wraps the descriptions
    assert "Karras et al. (2022)" in words and "multistep solver's order" in words
    solver = ["--model", "m", "--use-karras-sigmas", "true", "--solver-order", "1"]
    args = parser.parse_args(solver)
    assert args.use_karras_sigmas is True and args.solver_order == 1
    for bad in (
        ["--guidance", "0.5"],
        ["--steps", "0"],
        ["--sampler", "heun"],
        ["--n", "99"],
        ["--solver-order", "3"],
        ["--use-karras-sigmas", "maybe"],
    ):
        with pytest.raises(SystemExit):
            parser.parse_args(["--model", "m", *bad])


@pytest.mark.parametrize(
    "body",
    [
        {"model": "m", "n": "4"},
        {"model": "m", "n": True},
        {"model": "m", "seed": "12"},
        {"model": "m", "guidance_scale": "4"},
        {"model": "m", "output": {"trajectory": "yes"}},
    ],
)
def test_bodies_are_strict(body: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        GenerateBody.model_validate_json(__import__("json").dumps(body))


def test_guidance_weight_is_scale_minus_one() -> None:
    assert params.guidance_weight(params.NO_GUIDANCE) == 0.0
    assert params.guidance_weight(4.0) == 3.0
