"""The web demo: its JSON API against a live server (uvicorn in a thread on a free 127.0.0.1 port)
and, marked ``browser``, the page itself in headless Debian Chromium driven by Playwright."""
from __future__ import annotations

import base64
import io
import json
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
from PIL import Image  # noqa: E402

from glowflow import Glow, editing, latent  # noqa: E402
from glowflow.demo.server import create_app  # noqa: E402
from glowflow.images import png_bytes  # noqa: E402
from conftest import awake_glow  # noqa: E402

SHAPE = (1, 8, 8)
MAX_UPLOAD = 16 * 1024
MAX_PIXELS = 200 * 200
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _tiny_model() -> Glow:
    return awake_glow(SHAPE, 0.25 + 0.5 * torch.rand(32, *SHAPE, generator=torch.Generator().manual_seed(0)))


@contextmanager
def running(app):
    """Serve ``app`` with uvicorn in a thread on a socket bound here (so no port race)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the demo server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture(scope="module")
def demo():
    """(base url, model, directions, a test image) for one live server per module."""
    model = _tiny_model()
    g = torch.Generator().manual_seed(1)
    x = 0.3 + 0.4 * torch.rand(16, *SHAPE, generator=g)
    attrs = torch.stack([torch.arange(16) % 2, (torch.arange(16) // 8)], 1) * 2 - 1
    directions = latent.attribute_directions(model.encode(x).detach(), attrs, ["Smiling", "Bangs"])
    app = create_app(model, directions, test_images=x[:3], test_names=["t0", "t1", "t2"],
                     max_upload_bytes=MAX_UPLOAD, max_pixels=MAX_PIXELS)
    with running(app) as url:
        yield url, model, directions, x


def _image(data_url: str) -> torch.Tensor:
    assert data_url.startswith("data:image/png;base64,")
    img = Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1])))
    return torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(1, *img.size[::-1]).float() / 255


def _quantised(x: torch.Tensor) -> torch.Tensor:
    return (x * 255).round() / 255


# --------------------------------------------------------------------------------------- API

def test_upload_returns_input_and_its_reconstruction(demo):
    url, model, _, x = demo
    r = httpx.post(url + "/api/upload", content=png_bytes(x[0]))
    assert r.status_code == 200, r.text
    body = r.json()
    seen = _image(body["image"])
    torch.testing.assert_close(seen, _quantised(x[0]))
    expected = latent.reconstruct(model, seen)[0]
    torch.testing.assert_close(_image(body["reconstruction"]), _quantised(expected), atol=1 / 255, rtol=0)


def test_edit_with_zero_alphas_is_the_reconstruction_and_sliders_change_it(demo):
    url, model, directions, x = demo
    image = httpx.post(url + "/api/upload", content=png_bytes(x[1])).json()["image"]
    zero = httpx.post(url + "/api/edit", json={"image": image, "alphas": {"Smiling": 0.0}}).json()["image"]
    torch.testing.assert_close(_image(zero), _quantised(latent.reconstruct(model, _image(image))[0]),
                               atol=1 / 255, rtol=0)
    moved = httpx.post(url + "/api/edit", json={"image": image, "alphas": {"Smiling": 1.0}}).json()["image"]
    expected = latent.manipulate(model, _image(image), directions["Smiling"], 1.0)[0]
    torch.testing.assert_close(_image(moved), _quantised(expected), atol=1 / 255, rtol=0)
    assert not torch.equal(_image(moved), _image(zero))
    other = httpx.post(url + "/api/upload", content=png_bytes(x[2])).json()["image"]
    blended = httpx.post(url + "/api/edit", json={"image": image, "mix": other, "blend": 1.0}).json()["image"]
    torch.testing.assert_close(_image(blended), _image(other), atol=1 / 255, rtol=0)


@pytest.mark.parametrize("payload, status, message", [
    ({"image": "data:image/png;base64,!!!"}, 400, "base64 data URL"),
    ({"image": "IMAGE", "alphas": {"Moustache": 1}}, 400, "unknown attribute"),
    ({"image": "IMAGE", "alphas": {"Smiling": 1e6}}, 422, "alphas.Smiling"),
    ({"image": "IMAGE", "blend": 2}, 422, "blend"),
    ({"image": "IMAGE", "extra": 1}, 422, "extra"),
    ({"image": base64.b64encode(b"GIF89a-nope").decode()}, 415, "not a readable image"),
])
def test_edit_rejects_bad_requests_clearly(demo, payload, status, message):
    url, _, _, x = demo
    if payload.get("image") == "IMAGE":
        payload = {**payload, "image": "data:image/png;base64," + base64.b64encode(png_bytes(x[0])).decode()}
    r = httpx.post(url + "/api/edit", json=payload)
    assert r.status_code == status and message in r.json()["error"], r.text


def _cmyk_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("CMYK", (8, 8), (10, 20, 30, 40)).save(buf, "JPEG")
    return buf.getvalue()


def _huge_png() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (300, 300)).save(buf, "PNG")  # 90000 pixels in a few hundred bytes
    return buf.getvalue()


@pytest.mark.parametrize("make, status, message", [
    (lambda: b"this is a text file, not a picture", 415, "not a readable image"),
    (lambda: b"", 415, "the file is empty"),
    (lambda: b"\x89PNG\r\n\x1a\n" + b"\0" * 40, 415, "upload"),
    (_cmyk_jpeg, 415, "unsupported image mode 'CMYK'"),
    (_huge_png, 415, "pixels; the limit is 40000"),
    (lambda: b"\0" * (MAX_UPLOAD + 1), 413, "larger than the 16 KB limit"),
])
def test_upload_validation_gives_a_clear_error_and_the_server_keeps_serving(demo, make, status, message):
    url, _, _, x = demo
    r = httpx.post(url + "/api/upload", content=make())
    assert r.status_code == status, r.text
    assert message in r.json()["error"]
    assert httpx.get(url + "/api/info").status_code == 200
    assert httpx.post(url + "/api/upload", content=png_bytes(x[0])).status_code == 200


def test_chunked_upload_is_cut_off_at_the_limit(demo):
    url, _, _, x = demo

    def chunks():  # no Content-Length: the server must count the bytes itself
        for _ in range(8):
            yield b"\0" * 4096

    r = httpx.post(url + "/api/upload", content=chunks())
    assert r.status_code == 413 and "limit" in r.json()["error"]
    assert httpx.post(url + "/api/upload", content=png_bytes(x[0])).status_code == 200


def test_samples_follow_the_seed_and_temperature(demo):
    url, model, _, _ = demo
    a = httpx.post(url + "/api/sample", json={"n": 3, "temperature": 0.5, "seed": 7}).json()
    b = httpx.post(url + "/api/sample", json={"n": 3, "temperature": 0.5, "seed": 7}).json()
    assert len(a["images"]) == 3 and a["images"] == b["images"] and a["seed"] == 7
    expected = model.sample(3, 0.5, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(_image(a["images"][2]), _quantised(expected[2]), atol=1 / 255, rtol=0)
    cold = httpx.post(url + "/api/sample", json={"n": 1, "temperature": 0.0, "seed": 7}).json()
    torch.testing.assert_close(_image(cold["images"][0]), _quantised(model.sample(1, 0.0)[0]), atol=1 / 255, rtol=0)
    r = httpx.post(url + "/api/sample", json={"n": 1000})
    assert r.status_code == 422 and "n:" in r.json()["error"]


def test_a_sample_that_does_not_decode_is_drawn_grey_and_named_not_a_500(demo, monkeypatch):
    """At high temperature some latents lie where the inverse overflows (on a trained model, 5 of 5
    seeds at the page's 1.5 had one). Their decode is NaN: once a 500 for the whole grid; now those
    tiles are grey, the others drawn, and the answer names the failed ones for the page."""
    url, model, _, _ = demo
    expected = model.sample(4, 1.5, generator=torch.Generator().manual_seed(3))
    decode = model.decode

    def overflowing(eps, *args, **kwargs):
        out = decode(eps, *args, **kwargs)
        out[1] = float("nan")
        out[3, 0, 0, 0] = float("inf")
        return out
    monkeypatch.setattr(model, "decode", overflowing)
    r = httpx.post(url + "/api/sample", json={"n": 4, "temperature": 1.5, "seed": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["failed"] == [1, 3]
    assert "samples 2 and 4 of 4" in body["warning"] and "temperature 1.5" in body["warning"]
    got = [_image(u) for u in body["images"]]
    for i in (0, 2):
        torch.testing.assert_close(got[i], _quantised(expected[i]), atol=1 / 255, rtol=0)
    for i in (1, 3):
        assert (got[i] == _quantised(torch.tensor(0.5))).all()  # grey
    monkeypatch.undo()
    body = httpx.post(url + "/api/sample", json={"n": 2, "temperature": 0.5, "seed": 3}).json()
    assert body["failed"] == [] and body["warning"] is None


def test_concurrent_requests_give_the_sequential_answer_and_leave_the_model_unchanged(demo):
    url, model, _, x = demo
    before = {k: v.clone() for k, v in model.state_dict().items()}
    image = httpx.post(url + "/api/upload", content=png_bytes(x[3])).json()["image"]
    bodies = [{"image": image, "alphas": {"Smiling": a, "Bangs": -a}} for a in (-1.0, -0.5, 0.5, 1.0)] * 4
    sequential = [httpx.post(url + "/api/edit", json=b).json()["image"] for b in bodies[:4]] * 4
    # Spy on the model: count calls inside encode/decode at once, and whether autograd was on.
    inside, seen = [0], {"max_inside": 0, "grad": False, "training": False}
    guard = threading.Lock()

    def spy(method):
        def wrapped(*args, **kwargs):
            with guard:
                inside[0] += 1
                seen["max_inside"] = max(seen["max_inside"], inside[0])
                seen["grad"] |= torch.is_grad_enabled()
                seen["training"] |= model.training
            time.sleep(0.01)  # widen the window in which an unlocked second call would overlap
            try:
                return method(*args, **kwargs)
            finally:
                with guard:
                    inside[0] -= 1
        return wrapped

    model.encode, model.decode = spy(model.encode), spy(model.decode)
    try:
        with ThreadPoolExecutor(8) as pool:
            parallel = list(pool.map(lambda b: httpx.post(url + "/api/edit", json=b, timeout=30).json()["image"],
                                     bodies))
    finally:
        del model.encode, model.decode  # back to the class's methods
    assert parallel == sequential
    assert seen == {"max_inside": 1, "grad": False, "training": False}
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_slow_decode_does_not_hold_up_other_requests(demo, monkeypatch):
    """Images are decoded off the event loop: while one upload's decode is stuck, the server still
    answers. (Decoded on the loop, the info request would wait for it and time out.)"""
    import glowflow.demo.server as server

    url, _, _, x = demo
    entered, release = threading.Event(), threading.Event()
    load_image = server.load_image

    def stuck(*args, **kwargs):
        entered.set()
        release.wait(30)
        return load_image(*args, **kwargs)
    monkeypatch.setattr(server, "load_image", stuck)
    with ThreadPoolExecutor(1) as pool:
        upload = pool.submit(httpx.post, url + "/api/upload", content=png_bytes(x[0]), timeout=60)
        try:
            assert entered.wait(30)
            assert httpx.get(url + "/api/info", timeout=5).status_code == 200
        finally:
            release.set()
        assert upload.result().status_code == 200


def test_page_and_info_and_test_images(demo):
    url, _, _, _ = demo
    page = httpx.get(url + "/")
    assert page.status_code == 200 and 'id="file-a"' in page.text
    assert "default-src 'none'" in page.headers["content-security-policy"]
    info = httpx.get(url + "/api/info").json()
    assert [d["name"] for d in info["directions"]] == ["Smiling", "Bangs"]
    assert info["directions"][0]["positive_count"] == 8 and info["max_upload_bytes"] == MAX_UPLOAD
    names = [t["name"] for t in httpx.get(url + "/api/test-images").json()["images"]]
    assert names == ["t0", "t1", "t2"]


def test_create_app_refuses_an_uninitialised_model():
    with pytest.raises(ValueError, match="not been initialised"):
        create_app(Glow(image_shape=SHAPE, levels=2, steps=1, hidden_channels=4))


# ------------------------------------------------------------------------------------ browser

@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright python package is not installed")
    executable = CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")
    if executable is None:
        pytest.skip(f"Chromium is not installed (no {CHROMIUM}; on Debian: apt-get install chromium)")
    with sync_api.sync_playwright() as p:
        try:
            b = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        except Exception as e:  # noqa: BLE001 (a broken browser install)
            pytest.skip(f"Chromium at {executable} could not be started by Playwright: {e}")
        yield b
        b.close()


def open_page(browser, url: str):
    """A new page on the demo, loaded and ready; ``page.errors`` collects its script errors."""
    page = browser.new_page()
    page.set_default_timeout(20_000)
    page.errors = []
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    page.goto(url)
    page.wait_for_selector("body[data-ready=true]")
    return page


def _src(page, selector: str) -> str:
    return page.eval_on_selector(selector, "el => el.getAttribute('src') || ''")


def _wait_src_change(page, selector: str, old: str) -> str:
    page.wait_for_function("([sel, old]) => (document.querySelector(sel).getAttribute('src') || '') !== old",
                           arg=[selector, old])
    return _src(page, selector)


@pytest.mark.browser
def test_browser_shows_a_refused_edit_on_the_image_and_offers_the_edit_for_download(demo, browser, tmp_path,
                                                                                   monkeypatch):
    """An edit the server refuses leaves no older picture under the moved slider: the edited view is
    marked refused, without an image and without a download; the next good edit brings both back.
    The uploaded image's bits/dim is shown beside it, and each slider spans its measured range."""
    url, model, _, x = demo
    real = latent.edit

    def refusing(*args, **kwargs):  # an edit along Bangs past 0.5 "does not decode"
        alphas = args[3] if len(args) > 3 else kwargs.get("alphas") or {}
        if alphas.get("Bangs", 0.0) > 0.5:
            raise latent.DecodeError("the decode of this edit (Bangs) is not finite", [0])
        return real(*args, **kwargs)
    monkeypatch.setattr(editing, "edit", refusing)
    image = tmp_path / "a.png"
    image.write_bytes(png_bytes(x[4]))
    page = open_page(browser, url)
    info = httpx.get(url + "/api/info").json()
    for d in info["directions"]:  # the page's slider spans what the server measured
        low, high = d["alpha_range"]
        assert page.eval_on_selector(f".attr-slider[data-name={d['name']}]", "el => [Number(el.min), Number(el.max)]") \
            == [low, high]
        assert -2.0 <= low < 0 < high <= 2.0
    page.set_input_files("#file-a", str(image))
    _wait_src_change(page, "#reconstruction", "")
    bpd = float(model.bits_per_dim(_image(_src(page, "#original"))[None], generator=torch.Generator().manual_seed(0)))
    assert page.inner_text("#a-bpd") == f"{bpd:.2f} bits/dim"
    page.wait_for_function("() => !document.querySelector('#download').hidden")
    smiled = _src(page, "#edited")
    page.locator(".attr-slider[data-name=Smiling]").fill(str(info["directions"][0]["alpha_range"][1]))
    smiled = _wait_src_change(page, "#edited", smiled)
    assert page.get_attribute("#download", "href") == smiled

    page.locator(".attr-slider[data-name=Bangs]").fill(str(info["directions"][1]["alpha_range"][1]))
    page.wait_for_selector("#edited[data-refused=true]", state="attached")
    assert _src(page, "#edited") == ""  # the previous edit is gone, not left under the moved slider
    assert "refused" in page.inner_text("#edited-caption") and page.is_hidden("#download")
    assert "not finite" in page.inner_text("#error")

    page.locator(".attr-slider[data-name=Bangs]").fill("0")  # back where edits decode
    page.wait_for_function("() => document.querySelector('#edited').getAttribute('src')")
    assert page.get_attribute("#edited", "data-refused") is None and not page.is_hidden("#download")
    assert page.inner_text("#edited-caption") == "edited"
    assert not page.errors, page.errors
    page.close()


@pytest.mark.browser
def test_browser_upload_slider_blend_samples_and_errors(demo, browser, tmp_path):
    url, _, _, x = demo
    image_a, image_b, not_image = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "notes.png"
    image_a.write_bytes(png_bytes(x[4]))
    image_b.write_bytes(png_bytes(x[5]))
    not_image.write_text("this is not a picture")
    page = open_page(browser, url)
    errors = page.errors
    assert page.locator(".attr-slider").count() == 2

    page.set_input_files("#file-a", str(image_a))
    reconstruction = _wait_src_change(page, "#reconstruction", "")
    page.wait_for_function("() => document.querySelector('#edited').getAttribute('src')")
    edited = _src(page, "#edited")
    # "edited" may first show the reconstruction, then the server's alpha-0 edit: both are the same picture
    torch.testing.assert_close(_image(edited), _image(reconstruction), atol=1 / 255, rtol=0)

    page.locator(".attr-slider[data-name=Smiling]").fill("1")
    moved = _wait_src_change(page, "#edited", edited)
    assert not torch.equal(_image(moved), _image(reconstruction))
    assert page.locator(".attr-slider[data-name=Smiling] + output").inner_text() == "1.00"

    page.set_input_files("#file-b", str(image_b))
    _wait_src_change(page, "#mix-preview", "")
    edited = _src(page, "#edited")
    page.locator("#blend").fill("0.5")
    _wait_src_change(page, "#edited", edited)

    original = _src(page, "#original")
    page.set_input_files("#file-a", str(not_image))
    page.wait_for_selector("#error.shown")
    assert "not a readable image" in page.inner_text("#error")
    assert _src(page, "#original") == original  # the failed upload changed nothing
    page.set_input_files("#file-a", str(image_b))  # the server is still there, and the message goes
    original = _wait_src_change(page, "#original", original)
    page.wait_for_selector("#error:not(.shown)", state="attached")

    page.click("#gallery img[title=t1]")  # a test image instead of an upload
    _wait_src_change(page, "#original", original)
    page.fill("#num-samples", "3")
    page.click("#sample-button")
    page.wait_for_function("() => document.querySelectorAll('#samples img').length === 3")
    assert not errors, errors
    page.close()


@pytest.mark.browser
def test_browser_restore_panel_restores_a_drawn_occlusion_and_noise(demo, browser, tmp_path):
    """The restore panel: draw over A, restore; the observation is black where drawn and A
    elsewhere, the restoration and its uncertainty appear with the scores; then noise."""
    url, _, _, x = demo
    image = tmp_path / "a.png"
    image.write_bytes(png_bytes(x[6]))
    page = open_page(browser, url)
    assert page.is_disabled("#restore-button")  # nothing to restore before an image
    page.set_input_files("#file-a", str(image))
    _wait_src_change(page, "#reconstruction", "")
    page.select_option("#damage", "drawn")
    assert page.is_visible("#draw") and page.is_hidden("#noise-box")
    page.locator("#draw").scroll_into_view_if_needed()
    box = page.locator("#draw").bounding_box()
    page.mouse.move(box["x"] + 2, box["y"] + box["height"] / 2)  # a stroke across the middle row
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] - 2, box["y"] + box["height"] / 2, steps=8)
    page.mouse.up()
    page.click("#restore-button")
    restored = _wait_src_change(page, "#restored", "")
    observation = _image(_src(page, "#observation"))[0]
    original = _image(_src(page, "#original"))[0]
    hidden = observation == 0
    assert hidden[SHAPE[1] // 2].all()  # the stroke's row is hidden
    assert not hidden.all()
    assert (observation[~hidden] - original[~hidden]).abs().max() < 0.06  # elsewhere: A, with a little noise
    assert _src(page, "#uncertainty").startswith("data:image/png")
    assert "PSNR against A" in page.inner_text("#restore-note")

    page.select_option("#damage", "noise")
    assert page.is_visible("#noise-box") and page.is_hidden("#draw")
    page.locator("#noise").fill("0.2")
    page.click("#restore-button")
    _wait_src_change(page, "#restored", restored)
    noisy = _image(_src(page, "#observation"))[0]
    assert 0.1 < (noisy - original).std() < 0.3
    assert not page.errors, page.errors
    page.close()


def test_restore_api_damages_restores_and_refuses_bad_requests(demo):
    url, _, _, x = demo
    image = "data:image/png;base64," + base64.b64encode(png_bytes(x[7])).decode()
    res = httpx.post(url + "/api/restore", json={"image": image, "damage": "eyes"}, timeout=60)
    assert res.status_code == 200, res.text
    body = res.json()
    observation, restored = _image(body["observation"])[0], _image(body["restored"])[0]
    original = _quantised(x[7, 0])
    hidden = observation == 0
    assert hidden.any() and not hidden.all()
    # the restoration keeps what was seen and fills in what was not
    assert (restored[~hidden] - original[~hidden]).abs().mean() < 0.05
    assert restored[hidden].min() > 0
    assert body["psnr_db"] > body["observed_psnr_db"] and body["ssim"] is None  # 8x8: under SSIM's window
    again = httpx.post(url + "/api/restore", json={"image": image, "damage": "eyes"}, timeout=60).json()
    assert again["restored"] == body["restored"]  # the same request, the same answer
    for payload, status, message in [
        ({"damage": "drawn"}, 400, "needs the drawing"),
        ({"damage": "eyes", "mask": image}, 400, "damage \"drawn\" only"),
        ({"damage": "noise", "noise": 0.9}, 422, "noise"),
        ({"damage": "nose"}, 422, "damage"),
        ({"damage": "drawn", "mask": "data:image/png;base64," + base64.b64encode(png_bytes(torch.zeros(1, 8, 8))).decode()},
         400, "covers no pixel"),
    ]:
        res = httpx.post(url + "/api/restore", json={"image": image, **payload}, timeout=60)
        assert res.status_code == status and message in res.json()["error"], (payload, res.text)


def test_restore_api_denoises_with_a_model_of_noisy_images_up_to_its_level(demo):
    """With a denoiser, noise up to its level is its posterior mean (exactly restore.denoise's),
    noisier observations and occlusions stay the MAP under the model; a denoiser of clean images
    or of other images is refused when the app is made."""
    from glowflow import GlowConfig
    from glowflow import restore as rs
    from glowflow.demo.server import data_url
    _, model, _, x = demo
    denoiser = Glow(GlowConfig(**{**model.config.to_dict(), "noise_std": 0.1}))
    denoiser.load_state_dict(model.state_dict())
    app = create_app(model, denoiser=denoiser, max_upload_bytes=MAX_UPLOAD, max_pixels=MAX_PIXELS)
    image = "data:image/png;base64," + base64.b64encode(png_bytes(x[7])).decode()
    with running(app) as url:
        post = lambda **kw: httpx.post(url + "/api/restore", json={"image": image, **kw}, timeout=60).json()  # noqa: E731
        body = post(damage="noise", noise=0.05, seed=3)
        assert body["method"] == "posterior mean" and body["uncertainty_max"] == 0, body
        original = _image(image)
        y = rs.degrade(original[None], rs.Denoise(SHAPE), 0.05, seed=3)
        with torch.enable_grad():
            expected = rs.denoise(denoiser, y, 0.05, seed=3)[0]
        assert body["restored"] == data_url(expected)
        assert post(damage="noise", noise=0.2)["method"] == "map"
        assert post(damage="eyes")["method"] == "map"
    with pytest.raises(ValueError, match="model of noisy images"):
        create_app(model, denoiser=model)
    other = Glow(GlowConfig(**{**model.config.to_dict(), "noise_std": 0.1, "image_shape": (1, 16, 16)}))
    with pytest.raises(ValueError, match="of the model's images"):
        create_app(model, denoiser=other)


# --------------------------------------------------------------------------------------- hardening

def test_host_header_must_name_the_served_address(demo):
    url, *_ = demo
    port = url.rsplit(":", 1)[1]
    assert httpx.get(url + "/api/info", headers={"Host": f"localhost:{port}"}).status_code == 200
    r = httpx.get(url + "/api/info", headers={"Host": f"attacker.example:{port}"})  # DNS rebinding
    assert r.status_code == 421 and "Host" in r.json()["error"]
    r = httpx.get(url + "/", headers={"Host": "evil.test"})
    assert r.status_code == 421


def test_host_check_by_bind_address():
    from glowflow.demo.server import host_check

    loop = host_check("127.0.0.1", 8000)
    assert loop("127.0.0.1:8000") and loop("localhost:8000") and loop("[::1]:8000") and loop("LOCALHOST")
    assert not loop("127.0.0.1:9000") and not loop("example.com:8000") and not loop("")
    lan = host_check("192.168.1.5", None)
    assert lan("192.168.1.5:1234") and not lan("localhost")
    assert host_check("0.0.0.0", 8000) is None and host_check("::", 8000) is None
    assert host_check("127.0.0.1", 0)("localhost:43123")  # --port 0: the port the system picked


@pytest.mark.parametrize("bind, served, foreign", [
    ("0.0.0.0", "192.168.1.5:8123", 200),  # every interface: any name the machine is reached by
    ("::", "[fe80::1]:8123", 200),
    ("192.168.1.5", "192.168.1.5:8123", 421),  # one address: that one
    ("127.0.0.1", "localhost:8123", 421),  # the default: loopback names only, against DNS rebinding
])
def test_the_demo_command_answers_the_address_it_serves(tmp_path, monkeypatch, capsys, bind, served, foreign):
    """The CLI hands the address it binds to the app: a demo on 0.0.0.0 or a LAN address answers
    requests for it from other machines, a loopback one still refuses other names."""
    from glowflow.cli import main
    from glowflow.demo import server

    _tiny_model().save_pretrained(tmp_path / "ckpt")
    started = {}
    monkeypatch.setattr(server, "serve", lambda app, host, port: started.update(app=app, host=host, port=port))
    assert main(["demo", str(tmp_path / "ckpt"), "--host", bind, "--port", "8123", "--json"]) == 0
    assert (started["host"], started["port"]) == (bind, 8123)
    url = json.loads(capsys.readouterr().out.splitlines()[-1])["url"]
    assert httpx.URL(url).port == 8123  # an IPv6 address in brackets
    with running(started["app"]) as local:  # listening here; the Host header says what was asked for
        assert httpx.get(local + "/api/info", headers={"Host": served}).status_code == 200
        assert httpx.get(local + "/api/info", headers={"Host": "attacker.example:8123"}).status_code == foreign


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_json_endpoints_take_only_application_json(demo, content_type):
    url, *_ = demo
    headers = {} if content_type is None else {"Content-Type": content_type}
    for path in ("/api/edit", "/api/sample"):
        r = httpx.post(url + path, content=b'{"n": 1}', headers=headers)
        assert r.status_code == 415 and "application/json" in r.json()["error"], (path, r.text)


def test_pages_cannot_be_framed(demo):
    url, *_ = demo
    r = httpx.get(url + "/")
    assert r.headers["X-Frame-Options"] == "DENY" and "frame-ancestors 'none'" in r.headers["Content-Security-Policy"]


def test_alpha_bound_is_the_sliders_range_and_names_are_echoed_short(demo):
    url, _, _, x = demo
    image = "data:image/png;base64," + base64.b64encode(png_bytes(x[0])).decode()
    r = httpx.post(url + "/api/edit", json={"image": image, "alphas": {"Smiling": 1.5}})  # alpha_max is 1
    assert r.status_code == 422 and "[-1, 1]" in r.json()["error"]
    long_name = "A" * 5000
    r = httpx.post(url + "/api/edit", json={"image": image, "alphas": {long_name: 1, "b": 1, "c": 1, "d": 1}})
    error = r.json()["error"]
    assert r.status_code == 400 and len(error) < 300 and "and 1 more" in error


def test_size_errors_of_json_bodies_call_them_requests(demo):
    url, *_ = demo
    r = httpx.post(url + "/api/sample", content=b" " * (65 * 1024), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"].startswith("request is") and "upload" not in r.json()["error"]
