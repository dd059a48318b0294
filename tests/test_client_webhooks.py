"""The Python client sends `webhook` / `webhook_events_filter` on every job it creates (encode,
decode and reconstruct too, not only generate / inpaint), as bodies the gateway's own schemas take."""

from __future__ import annotations

import inspect

import numpy as np
from PIL import Image

from ddserve.client import AsyncClient, Client, bodies
from ddserve.requests import DecodeBody, EncodeBody, ReconstructBody

HOOK = {"webhook": "https://hooks.example.com/ddserve", "webhook_events_filter": ["completed"]}


def test_codec_bodies_carry_the_webhook_and_validate() -> None:
    image = Image.new("L", (8, 8), 100)
    built = {
        EncodeBody: bodies.encode_body("m", [image], **HOOK),
        DecodeBody: bodies.decode_body("m", latents=np.zeros((1, 2)), **HOOK),
        ReconstructBody: bodies.reconstruct_body("m", [image], **HOOK),
    }
    for body_class, body in built.items():
        assert {k: body[k] for k in HOOK} == HOOK
        parsed = body_class.model_validate(body)
        assert str(parsed.webhook) == HOOK["webhook"]
    plain = bodies.encode_body("m", [image])
    assert "webhook" not in plain and "webhook_events_filter" not in plain


def test_every_job_method_of_both_clients_takes_a_webhook() -> None:
    for client in (Client, AsyncClient):
        for name in ("encode", "decode", "reconstruct"):
            parameters = inspect.signature(getattr(client, name)).parameters
            assert {"webhook", "webhook_events_filter"} <= set(parameters), (client, name)
