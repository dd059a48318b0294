"""`ddserve generate`: sample images and write them as one PNG grid, with a progress bar.

    ddserve generate --model digits-ddpm --class 7 --n 16 --out grid.png
    ddserve generate --model digits-ddpm --url http://127.0.0.1:8000 --api-key KEY --steps 100

With `--url` (or DDSERVE_URL) it calls that gateway (API key: `--api-key` or DDSERVE_API_KEY; an
empty one counts as none, with a note); without, it starts the stack in this process
(`ddserve.embedded.LocalServer`: the gateway, a worker thread with the model loaded, fakeredis,
images in a temporary folder) and talks to it through the same client.
The bar follows the job's progress (`GET /jobs/{id}`); Ctrl-C cancels the job.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import TypeAdapter, ValidationError

from ddserve.client.errors import DdserveError
from ddserve.client.grid import image_grid
from ddserve.client.sync import Client
from ddserve.client.types import Job
from ddserve.requests import GenerateBody

URL_ENV = "DDSERVE_URL"
API_KEY_ENV = "DDSERVE_API_KEY"


# Sampling options, derived from the request body's own fields (`ddserve.requests.GenerateBody`):
# their type, limits, choices and help text are declared once, in `ddserve.params`.
BODY_OPTIONS: dict[str, tuple[str, ...]] = {
    "prompt": ("--prompt",),
    "negative_prompt": ("--negative-prompt",),
    "n": ("--n",),
    "sampler": ("--sampler",),
    "num_inference_steps": ("--num-inference-steps", "--steps"),
    "eta": ("--eta",),
    "use_karras_sigmas": ("--use-karras-sigmas",),
    "solver_order": ("--solver-order",),
    "guidance_scale": ("--guidance-scale", "--guidance"),
    "classifier_scale": ("--classifier-scale",),
    "seed": ("--seed",),
    "height": ("--height",),
    "width": ("--width",),
}
CLI_DEFAULTS = {"n": 16}  # a grid; the HTTP default is 1


def body_option(parser: argparse.ArgumentParser, name: str, flags: tuple[str, ...]) -> None:
    """`--flag` for the body field `name`: parsed and checked by the field's own type."""
    field = GenerateBody.model_fields[name]
    checked = Annotated[field.annotation, *field.metadata] if field.metadata else field.annotation
    adapter: TypeAdapter[Any] = TypeAdapter(checked)
    choices = _literal_choices(field.annotation)

    def parse(text: str) -> Any:
        try:
            return adapter.validate_python(text, strict=False)
        except ValidationError as exc:
            message = exc.errors(include_url=False)[0]["msg"]
            raise argparse.ArgumentTypeError(f"{text!r}: {message}") from None

    default = CLI_DEFAULTS.get(name)
    help_text = field.description or ""
    if default is not None:
        help_text += f" (default {default})"
    parser.add_argument(
        *flags, dest=name, type=parse, default=default, choices=choices, help=help_text
    )


def _literal_choices(annotation: Any) -> list[str] | None:
    """The values of a Literal inside `annotation` (e.g. `Annotated[Literal[...], ...] | None`)."""
    for arg in get_args(annotation) or (annotation,):
        if get_origin(arg) is Annotated:
            arg = get_args(arg)[0]
        if get_origin(arg) is Literal:
            return [str(v) for v in get_args(arg)]
    return None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a model of GET /models, e.g. digits-ddpm")
    parser.add_argument(
        "--class",
        dest="class_label",
        default=None,
        help="class index or name (class-conditional models); default: unconditional",
    )
    for name, flags in BODY_OPTIONS.items():
        body_option(parser, name, flags)
    parser.add_argument("--out", type=Path, default=Path("grid.png"), help="the PNG grid to write")
    parser.add_argument("--trajectory", type=Path, default=None, help="also write x_t as a GIF")
    parser.add_argument("--columns", type=int, default=None, help="images per row (default √n)")
    parser.add_argument("--scale", type=int, default=4, help="enlarge each image (nearest; 4)")
    parser.add_argument(
        "--url",
        default=os.environ.get(URL_ENV),
        help=f"gateway URL (or {URL_ENV}); without one, the stack runs in this process",
    )
    parser.add_argument(
        "--api-key",
        nargs="?",
        const="",  # `--api-key $KEY` with an empty $KEY: the shell drops the value
        default=None,
        help=f"API key (or {API_KEY_ENV}); an empty one counts as not given",
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the job")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


class ProgressBar:
    """A tqdm bar on stderr driven by the job's states: queue position, then step / total."""

    def __init__(self, description: str, enabled: bool) -> None:
        from tqdm import tqdm

        self.bar = tqdm(
            total=None, desc=description, unit="step", disable=not enabled, file=sys.stderr
        )

    def __call__(self, job: Job) -> None:
        if job.status == "queued":
            ahead = job.queue_position
            self.bar.set_postfix_str("queued" + (f", {ahead} ahead" if ahead else ""))
        elif job.progress is not None:
            if self.bar.total != job.progress.total:
                self.bar.reset(total=job.progress.total)
            self.bar.n = job.progress.step
            self.bar.set_postfix_str(str(job.status))
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def resolve_api_key(given: str | None, environ: Mapping[str, str]) -> tuple[str | None, list[str]]:
    """The API key to send, from `--api-key` else DDSERVE_API_KEY, and what to tell the user.

    An empty key (an unset shell variable in `--api-key "$KEY"`, or `--api-key $KEY` whose value
    the shell dropped) counts as not given, with a note saying so: sent as is, it meant no
    Authorization header and a bare 401 from the gateway, with nothing pointing at the empty
    variable. Surrounding whitespace (a key read from a file) is removed.
    """
    notes: list[str] = []
    for source, value in (("--api-key", given), (API_KEY_ENV, environ.get(API_KEY_ENV))):
        if value is None:
            continue
        if value.strip():
            return value.strip(), notes
        notes.append(f"{source} is empty (an unset shell variable?): ignored")
    if notes:
        notes.append(
            f"sending no API key: a gateway with auth on answers 401 "
            f"(pass --api-key KEY or set {API_KEY_ENV})"
        )
    return None, notes


def resolve_class(client: Client, model: str, given: str | None) -> int | None:
    """A class index from `--class`: an index, or a name of the model's classes."""
    if given is None:
        return None
    if given.isdigit():
        return int(given)
    classes = client.model(model).classes
    if given not in classes:
        raise ValueError(f"--class {given!r}: {model} has the classes {', '.join(classes)}")
    return classes.index(given)


@contextlib.contextmanager
def connect(args: argparse.Namespace) -> Iterator[Client]:
    """A client of `--url`, or of a `LocalServer` started here for the one model."""
    if args.url:
        key, notes = resolve_api_key(args.api_key, os.environ)
        for note in notes:
            print(f"ddserve generate: {note}", file=sys.stderr)
        with Client(args.url, api_key=key) as client:
            yield client
        return
    from ddserve.embedded import LocalServer
    from ddserve.logs import configure_logging
    from ddserve.settings import Settings

    with tempfile.TemporaryDirectory(prefix="ddserve-generate-") as scratch:
        settings = Settings(redis_url=None, models=args.model, auth_enabled=False, storage="local")
        settings.storage_dir = Path(scratch)
        settings.progress_every = 1  # a smooth bar; the cost is one Redis write per step
        settings.log_level = "WARNING"  # the worker's own lines would break the bar
        configure_logging(settings.log_level, False)
        from workers.threads import apply_threads

        apply_threads(settings, embedded=True)  # the gateway shares this process
        print(f"no --url: loading {args.model} in this process …", file=sys.stderr)
        with LocalServer(settings) as server, Client(server.url) as client:
            yield client


def run(args: argparse.Namespace) -> int:
    try:
        with connect(args) as client:
            return generate(client, args)
    except DdserveError as error:
        print(f"ddserve generate: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    except ValueError as error:  # a --class name the model does not have, a bad setting
        print(f"ddserve generate: {error}", file=sys.stderr)
        return 1


def generate(client: Client, args: argparse.Namespace) -> int:
    options: dict[str, Any] = {name: getattr(args, name) for name in BODY_OPTIONS}
    options["class_label"] = resolve_class(client, args.model, args.class_label)
    options["trajectory"] = args.trajectory is not None
    started = time.perf_counter()
    job = client.generate(args.model, wait=False, **options)
    bar = ProgressBar(args.model, enabled=not args.quiet)
    try:
        job = client.wait(job, timeout=args.timeout, poll_interval=0.1, on_progress=bar)
    except KeyboardInterrupt:
        bar.close()
        client.cancel(job)
        print(f"canceled job {job.id}", file=sys.stderr)
        return 130
    finally:
        bar.close()
    grid = image_grid(client.download_images(job), columns=args.columns, scale=args.scale)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(args.out)
    if args.trajectory is not None and job.output is not None and job.output.trajectory_url:
        args.trajectory.parent.mkdir(parents=True, exist_ok=True)
        args.trajectory.write_bytes(client.download(job.output.trajectory_url))
    used = job.input
    print(
        f"wrote {args.out} ({len(job.images)} images of {args.model}, {used.get('sampler')} "
        f"{used.get('num_inference_steps')} steps, seed {used.get('seed')}) in "
        f"{time.perf_counter() - started:.1f} s",
        file=sys.stderr,
    )
    return 0
