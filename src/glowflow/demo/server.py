"""The web demo: one page (``index.html``) over a small JSON API around a trained Glow.

Wire formats are JSON and PNG only (images travel as ``data:image/png;base64,...`` strings; uploads
as the raw file bytes), nothing that executes code when decoded. Every request body is read with a
byte limit, every image is validated (:func:`glowflow.images.open_image`), and a bad request gets a
JSON ``{"error": message}`` with a 4xx status while the server keeps serving.

Image decoding and inference run in worker threads, never on the event loop, so that one slow
request (a large upload, a big batch of samples) does not stop the server answering the others.
Inference runs one call at a time under a lock, in eval mode without autograd: the model holds
caches (e.g. the inverse 1x1 conv weights) that concurrent calls must not race on.

API (all responses JSON):
  GET  /                 the page
  GET  /api/info         image shape, directions with their counts, limits
  GET  /api/test-images  [{name, image}] preset images to start from
  POST /api/upload       body: image file bytes -> {image (as the model sees it), reconstruction}
  POST /api/edit         {image, alphas: {name: a}, mix, blend, method, label, mix_label} -> {image}
  POST /api/sample       {n, temperature, seed, label} -> {images, seed, temperature, failed, warning}
  POST /api/restore      {image, damage, mask, noise, seed} -> {observation, restored, uncertainty, psnr_db,
                         observed_psnr_db, ssim, uncertainty_max, method, seconds}: damage the image (a
                         named occlusion, a drawn mask, or noise), then restore it with the flow as the
                         prior (method "map"), or denoise it with a model of noisy images ("posterior mean")
"""
from __future__ import annotations

import base64
import binascii
import logging
import math
import secrets
import threading
import time
from pathlib import Path
from typing import Annotated, Literal

import torch
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from .. import editing
from .. import restore as rs
from ..directions import Directions
from ..images import DEFAULT_MAX_PIXELS, ImageError, load_image, png_bytes
from . import MAX_UPLOAD_MB

log = logging.getLogger("glowflow.demo")

DEFAULT_MAX_UPLOAD_BYTES = 4 * 1024 * 1024
MAX_SAMPLES = 32
MAX_ALPHA = 10.0  # far past any useful edit; bounds what a request can ask the decoder for
PAGE = Path(__file__).with_name("index.html")
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; img-src 'self' data: blob:; connect-src 'self' data:; "
                               "script-src 'unsafe-inline'; style-src 'unsafe-inline'; base-uri 'none'; "
                               "form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}
NAME_ECHO = 40  # characters of an unknown name an error message repeats
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]", "::1")

Alpha = Annotated[float, Field(ge=-MAX_ALPHA, le=MAX_ALPHA, allow_inf_nan=False)]


class EditRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image: str
    alphas: dict[str, Alpha] = {}
    mix: str | None = None
    blend: float = Field(0.0, ge=0.0, le=1.0, allow_inf_nan=False)
    method: Literal["linear", "spherical"] = "linear"
    label: int | None = None
    mix_label: int | None = None


class SampleRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n: int = Field(8, ge=1, le=MAX_SAMPLES)
    temperature: float = Field(0.7, ge=0.0, le=2.0, allow_inf_nan=False)
    seed: int | None = Field(None, ge=0, lt=2**63)
    label: int | None = None


class RestoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image: str
    damage: Literal["eyes", "mouth", "centre", "random", "drawn", "noise"] = "eyes"
    mask: str | None = None  # damage "drawn": a PNG of the model's size, white where pixels are missing
    noise: float = Field(0.1, ge=0.0, le=0.5, allow_inf_nan=False)  # damage "noise": its standard deviation
    seed: int = Field(0, ge=0, lt=2**63)


# How the demo restores: few enough steps to answer within a minute on 2 CPU cores (a 64x64 face: 41 s)
RESTORE_SETTINGS = {"views": 2, "steps": 10, "samples": 12}


class DemoError(Exception):
    """A request the demo refuses: ``status``, a message for the page, and ``refused`` for an edit
    whose decode failed (the page then shows that image as refused)."""

    def __init__(self, status: int, message: str, refused: bool = False):
        super().__init__(message)
        self.status = status
        self.message = message
        self.refused = refused


def data_url(image: torch.Tensor) -> str:
    """One image ``[C, H, W]`` -> ``data:image/png;base64,...``."""
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode("ascii")


def _decode_data_url(value: str, field: str, max_bytes: int) -> bytes:
    """``data:image/png;base64,...`` (or bare base64) -> bytes, refusing more than ``max_bytes``."""
    payload = value.split(",", 1)[1] if value.startswith("data:") and "," in value else value
    if len(payload) > 4 * math.ceil(max_bytes / 3) + 4:
        raise DemoError(413, f"{field}: image is larger than the {_mb(max_bytes)} limit")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise DemoError(400, f"{field}: expected an image as a base64 data URL "
                             "(data:image/png;base64,...)") from None


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 1024:.0f} KB"


class DemoState:
    """The model and what the page needs; every model call goes through :meth:`run`."""

    def __init__(self, model, directions: Directions | None, test_images, test_names,
                 class_names, max_upload_bytes: int, max_pixels: int, alpha_max: float):
        self.model = model
        self.directions = directions
        self.test_images = test_images
        self.test_names = test_names
        self.class_names = class_names
        self.max_upload_bytes = max_upload_bytes
        self.max_pixels = max_pixels
        self.alpha_max = alpha_max
        self.lock = threading.Lock()

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.model.config.image_shape)

    def run(self, fn, *args, **kwargs):
        with self.lock, torch.no_grad():
            try:
                return fn(*args, **kwargs)
            except editing.DecodeError as e:  # an edit the model cannot invert: say so, don't draw black
                raise DemoError(422, f"{e}. Move the sliders back towards 0.", refused=True) from None

    def read_image(self, data: bytes, field: str = "image") -> torch.Tensor:
        if len(data) > self.max_upload_bytes:
            raise DemoError(413, f"{field}: file is {_mb(len(data))}, larger than the "
                                 f"{_mb(self.max_upload_bytes)} limit")
        try:
            return load_image(data, self.image_shape, self.max_pixels)
        except ImageError as e:
            raise DemoError(415, str(e).replace("uploaded data", field)) from None

    def label(self, label: int | None) -> int | None:
        k = self.model.config.num_classes
        if not k:
            if label is not None:
                raise DemoError(400, "this model is not class-conditional: leave the label out")
            return None
        if label is None:
            return 0
        if not 0 <= label < k:
            raise DemoError(400, f"label must lie in [0, {k}), got {label}")
        return label


async def _read_body(request: Request, limit: int, kind: str = "upload") -> bytes:
    """The request body, refused with 413 as soon as it passes ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise DemoError(413, f"{kind} is {_mb(int(declared))}, larger than the {_mb(limit)} limit")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise DemoError(413, f"{kind} is larger than the {_mb(limit)} limit")
        chunks.append(chunk)
    return b"".join(chunks)


async def _read_json(request: Request, model_cls, limit: int):
    """A JSON request body: only with ``Content-Type: application/json``, which a cross-site form or
    ``text/plain`` fetch cannot send without the browser asking first."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json":
        raise DemoError(415, f"expected Content-Type: application/json, got {media_type[:NAME_ECHO] or 'none'}")
    return _parse(model_cls, await _read_body(request, limit, kind="request"))


def _short(name: str) -> str:
    return repr(name if len(name) <= NAME_ECHO else name[:NAME_ECHO] + "...")


def _split_host(header: str) -> tuple[str, int | None]:
    """``"name:port"`` / ``"[::1]:port"`` / ``"name"`` -> (name, port or None)."""
    header = header.strip().lower()
    if header.startswith("["):
        name, _, rest = header[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    else:
        name, _, port = header.partition(":")
    return name, int(port) if port.isdigit() else None


def host_check(host: str | None, port: int | None):
    """A predicate on ``Host`` headers for a server bound to ``host``: its own name (and, on
    loopback, the usual names of loopback), on ``port`` if given (0, a port the system picks, is not
    known here: any). It stops DNS rebinding: a page on another site that resolves its own name to
    127.0.0.1 to read, through the visitor's browser, a demo that only this machine can reach.

    None (answer any) when ``host`` is None or every interface (0.0.0.0, ::): there the operator
    chose to be reachable from the network under whatever names reach the machine (its host name,
    its addresses, an alias, a tunnel), and anyone on that network can read the demo directly, so
    the check would refuse real users while protecting nothing private."""
    if host is None or host in ("0.0.0.0", "::", "[::]", ""):
        return None
    port = port or None
    names = {host.strip("[]").lower()}
    if names & set(LOOPBACK_NAMES):
        names.update(n.strip("[]") for n in LOOPBACK_NAMES)

    def allowed(header: str) -> bool:
        name, header_port = _split_host(header)
        return name in names and (port is None or header_port in (None, port))
    return allowed


def _parse(model_cls, body: bytes):
    try:
        return model_cls.model_validate_json(body or b"{}")
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}"
                             for err in e.errors()[:5])
        raise DemoError(422, f"bad request: {problems}") from None


def create_app(model, directions: Directions | None = None, test_images: torch.Tensor | None = None,
               test_names: list[str] | None = None, class_names: list[str] | None = None,
               max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES, max_pixels: int = DEFAULT_MAX_PIXELS,
               alpha_max: float = 1.0, host: str | None = "127.0.0.1", port: int | None = None,
               restore_settings: dict | None = None, denoiser=None) -> FastAPI:
    """The demo app for ``model`` (a trained, initialised Glow).

    ``directions``: the sliders. ``test_images`` ``[N, C, H, W]`` (uint8 or float in [0, 1]) with
    ``test_names``: images to pick instead of uploading. ``class_names``: labels of a
    class-conditional model. ``alpha_max``: the sliders' range is ``[-alpha_max, alpha_max]``, and
    the server refuses more. ``host``/``port``: where it is served; requests whose ``Host`` header
    names anything else are refused (:func:`host_check`); ``host=None`` answers any.
    ``restore_settings``: the restore panel's ``views``, ``steps`` and ``samples``
    (:data:`RESTORE_SETTINGS` by default). ``denoiser``: a model of noisy images of the same shape
    (``noise_std`` > 0 in its config, e.g. ``orl-faces-denoise``); the restore panel then denoises
    noise up to its level with it (:func:`glowflow.restore.denoise`: the posterior mean, in a
    second or two) instead of the MAP estimate under ``model``.
    """
    settings = {**RESTORE_SETTINGS, **(restore_settings or {})}
    model.require_initialized()
    if denoiser is not None:
        if not denoiser.config.noise_std:
            raise ValueError("the denoiser must be a model of noisy images (noise_std > 0 in its config, "
                             "e.g. orl-faces-denoise)")
        if tuple(denoiser.config.image_shape) != tuple(model.config.image_shape) or denoiser.config.num_classes:
            raise ValueError(f"the denoiser must be an unconditional model of the model's images "
                             f"{list(model.config.image_shape)}, got {list(denoiser.config.image_shape)}"
                             + (" (class-conditional)" if denoiser.config.num_classes else ""))
        denoiser.require_initialized()
    if directions is not None and directions.num_dims != model.num_dims:
        raise ValueError(f"directions have dimension {directions.num_dims}, the model's latents "
                         f"{model.num_dims}")
    if not 0 < alpha_max <= MAX_ALPHA:
        raise ValueError(f"alpha_max must lie in (0, {MAX_ALPHA}], got {alpha_max}")
    if not 1 <= max_upload_bytes <= MAX_UPLOAD_MB * 2**20:
        raise ValueError(f"max_upload_bytes must lie in [1, {MAX_UPLOAD_MB * 2**20}] ({MAX_UPLOAD_MB} MB), "
                         f"got {max_upload_bytes}")
    for served in (model,) if denoiser is None else (model, denoiser):
        served.eval()
        for p in served.parameters():
            p.requires_grad_(False)
    if test_images is not None:
        test_images = test_images.detach().cpu()
        if tuple(test_images.shape[1:]) != tuple(model.config.image_shape):
            raise ValueError(f"test images must be [N, {', '.join(map(str, model.config.image_shape))}], "
                             f"got {list(test_images.shape)}")
        test_names = list(test_names or [f"test {i}" for i in range(len(test_images))])
    state = DemoState(model, directions, test_images, test_names, class_names, max_upload_bytes,
                      max_pixels, alpha_max)
    ranges = slider_ranges(model, directions, test_images, alpha_max)
    # The JSON of /api/edit carries two base64 images (4/3 larger) plus small fields.
    json_limit = 2 * (4 * math.ceil(max_upload_bytes / 3) + 64) + 64 * 1024

    app = FastAPI(title="glowflow demo", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.demo = state
    host_allowed = host_check(host, port)

    @app.exception_handler(DemoError)
    async def _demo_error(request: Request, exc: DemoError):
        body = {"error": exc.message, **({"refused": True} if exc.refused else {})}
        return JSONResponse(body, status_code=exc.status)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("demo request %s failed", request.url.path)
        return JSONResponse({"error": f"internal error ({type(exc).__name__}: {exc})"}, status_code=500)

    @app.middleware("http")
    async def _headers(request: Request, call_next):
        if host_allowed is not None and not host_allowed(request.headers.get("host", "")):
            response = JSONResponse({"error": "unknown Host header: this demo answers only the address it "
                                              "serves on"}, status_code=421)
        else:
            response = await call_next(request)
        for k, v in SECURITY_HEADERS.items():
            response.headers.setdefault(k, v)
        return response

    @app.get("/", response_class=HTMLResponse)
    def page():
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/api/info")
    def info():
        cfg = model.config
        return {
            "image_shape": list(cfg.image_shape),
            "num_dims": model.num_dims,
            "num_classes": cfg.num_classes,
            "class_names": class_names,
            "directions": [{**d, "alpha_range": ranges[d["name"]]} for d in directions.info()]
                          if directions is not None else [],
            "alpha_max": alpha_max,
            "max_upload_bytes": max_upload_bytes,
            "max_pixels": max_pixels,
            "max_samples": MAX_SAMPLES,
            "num_test_images": 0 if test_images is None else len(test_images),
        }

    @app.get("/api/test-images")
    def test_image_list():
        if state.test_images is None:
            return {"images": []}
        return {"images": [{"name": name, "image": data_url(img)}
                           for name, img in zip(state.test_names, state.test_images)]}

    @app.post("/api/upload")
    async def upload(request: Request):
        data = await _read_body(request, max_upload_bytes)
        x = await run_in_threadpool(state.read_image, data, "upload")
        label = state.label(_int_or_none(request.query_params.get("label")))
        recon = await run_in_threadpool(state.run, editing.reconstruct, model, x, label)
        bpd = await run_in_threadpool(state.run, bits_per_dim, model, x, label)
        return {"image": data_url(x), "reconstruction": data_url(recon[0]), "bits_per_dim": bpd}

    @app.post("/api/edit")
    async def edit(request: Request):
        req = await _read_json(request, EditRequest, json_limit)
        x = await run_in_threadpool(state.read_image, _decode_data_url(req.image, "image", max_upload_bytes), "image")
        mix = None
        if req.mix is not None:
            mix = await run_in_threadpool(state.read_image, _decode_data_url(req.mix, "mix", max_upload_bytes), "mix")
        alphas = {k: v for k, v in req.alphas.items() if v != 0.0}
        unknown = [k for k in alphas if directions is None or k not in directions]
        if unknown:
            more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
            raise DemoError(400, f"unknown attribute(s) {', '.join(_short(k) for k in unknown[:3])}{more}; this "
                                 f"model has {', '.join(directions.names) if directions else 'no directions'}")
        too_far = {k: v for k, v in alphas.items() if abs(v) > state.alpha_max}
        if too_far:
            name, value = next(iter(too_far.items()))
            raise DemoError(422, f"alpha for {_short(name)} is {value:g}; the sliders span "
                                 f"[{-state.alpha_max:g}, {state.alpha_max:g}]")
        label = state.label(req.label)
        mix_label = state.label(req.mix_label) if mix is not None else None
        out = await run_in_threadpool(state.run, editing.edit, model, x, directions, alphas, mix,
                                      req.blend, req.method, label, mix_label)
        return {"image": data_url(out[0])}

    @app.post("/api/sample")
    async def sample(request: Request):
        req = await _read_json(request, SampleRequest, 64 * 1024)
        seed = req.seed if req.seed is not None else secrets.randbelow(2**31)
        label = state.label(req.label)
        y = None if label is None else torch.full((req.n,), label, dtype=torch.long)
        generator = torch.Generator().manual_seed(seed)
        images, failed = await run_in_threadpool(state.run, editing.sample, model, req.n, req.temperature, y,
                                                 generator)
        warning = None
        if failed:  # drawn grey: the page shows the other samples and says why these are missing
            numbers = [str(i + 1) for i in failed]
            which = numbers[0] if len(numbers) == 1 else ", ".join(numbers[:-1]) + " and " + numbers[-1]
            warning = (f"sample{'s' if len(failed) > 1 else ''} {which} of {req.n} at temperature "
                       f"{req.temperature:g} did not decode to finite values (the model's inverse overflows "
                       "there): drawn grey; a lower temperature keeps closer to the data")
        return {"images": [data_url(img) for img in images], "seed": seed, "temperature": req.temperature,
                "failed": failed, "warning": warning}

    @app.post("/api/restore")
    async def restore_panel(request: Request):
        req = await _read_json(request, RestoreRequest, json_limit)
        if model.config.num_classes:
            raise DemoError(400, "restoring needs an unconditional model")
        x = await run_in_threadpool(state.read_image, _decode_data_url(req.image, "image", max_upload_bytes), "image")
        mask = None
        if req.damage == "drawn":
            if req.mask is None:
                raise DemoError(400, "damage \"drawn\" needs the drawing: mask, a PNG white where pixels are missing")
            picture = await run_in_threadpool(state.read_image, _decode_data_url(req.mask, "mask", max_upload_bytes),
                                              "mask")
            mask = (picture.mean(0) < 0.5).float()  # 1: observed
            if mask.all():
                raise DemoError(400, "the drawing covers no pixel: draw over the part of the image to hide")
            if not mask.any():
                raise DemoError(400, "the drawing covers the whole image: leave some of it to restore from")
        elif req.mask is not None:
            raise DemoError(400, "mask goes with damage \"drawn\" only")
        return await run_in_threadpool(state.run, restore_image, model, x, req.damage, mask, req.noise, req.seed,
                                       settings, denoiser)

    return app


def restore_image(model, x: torch.Tensor, damage: str, mask: torch.Tensor | None, noise: float, seed: int,
                  settings: dict, denoiser=None) -> dict:
    """Damage one image ``[C, H, W]`` as asked, restore it (MAP over ``settings["views"]``, then
    posterior samples for the uncertainty; noise up to the ``denoiser``'s level: its posterior mean,
    which has no uncertainty map) and return the pictures and the scores."""
    start = time.perf_counter()
    shape = tuple(model.config.image_shape)
    if damage == "noise":
        op, sigma = rs.Denoise(shape), noise
    else:
        op = rs.Inpaint(shape, mask) if damage == "drawn" else rs.Inpaint.region(shape, damage, 0.3, seed)
        sigma = rs.DEFAULT_NOISE["other"]
    y = rs.degrade(x[None], op, sigma, seed)
    tweedie = damage == "noise" and denoiser is not None and sigma <= denoiser.config.noise_std
    with torch.enable_grad():
        if tweedie:
            restored, post = rs.denoise(denoiser, y, sigma, seed=seed)[0], None
        else:
            result = rs.restore(model, y, op, sigma, steps=settings["steps"], views=settings["views"], init="zero")
            post = rs.posterior_samples(model, y, op, sigma, result.latents, num_samples=max(2, settings["samples"]),
                                        seed=seed) if settings["samples"] else None
            restored = result.images[0]
    std = post.std[0] if post is not None else torch.zeros_like(restored)
    top = float(std.max())
    seen = op.picture(y)
    out = {"observation": data_url(seen[0]), "restored": data_url(restored),
           "uncertainty": data_url(std / max(top, 1e-8)), "uncertainty_max": top,
           "psnr_db": float(rs.psnr(restored[None], x[None])),
           "observed_psnr_db": float(rs.psnr(seen, x[None])),
           "ssim": float(rs.ssim(restored[None], x[None])) if min(shape[1:]) >= rs.SSIM_WINDOW else None,
           "method": "posterior mean" if tweedie else "map"}
    out["seconds"] = round(time.perf_counter() - start, 2)
    return out


def bits_per_dim(model, x: torch.Tensor, label: int | None) -> float:
    """The image's bits/dim under the model, with a fixed dequantisation draw (the same image, the
    same number)."""
    x = x if x.dim() == 4 else x[None]
    y = None if label is None else torch.tensor([label])
    return float(model.bits_per_dim(x, y, generator=torch.Generator().manual_seed(0))[0])


# Held-out images a slider's range is measured on (editing.valid_alpha_range), at most.
RANGE_IMAGES = 16


def slider_ranges(model, directions, test_images, alpha_max: float) -> dict[str, list[float]]:
    """Each direction's slider range: where its edits of the test images stay valid, within
    ``[-alpha_max, alpha_max]``; without test images, that whole span."""
    if directions is None:
        return {}
    if test_images is None or not len(test_images) or model.config.num_classes:
        return {name: [-alpha_max, alpha_max] for name in directions.names}
    x = test_images[:RANGE_IMAGES]
    return {name: list(editing.valid_alpha_range(model, x, directions[name], alpha_max)) for name in directions.names}


def _int_or_none(value: str | None) -> int | None:
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise DemoError(400, f"label must be an integer, got {value!r}") from None


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run ``app`` with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level)
