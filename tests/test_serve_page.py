"""The page at ``GET /`` of ``imgrec serve``, driven in a real headless Chromium (Selenium).

One tiny trained model, one real uvicorn server and one browser for the module. The page is
checked as a person uses it: pick a file (the hidden ``<input id="file">``), or drop one on
``#drop``; the top class and the top-5 bars must be what ``Classifier.predict`` says for the
same file, and a bad file must show the server's error and leave the page usable.

Needs Chromium and its driver (Debian: ``apt-get install chromium chromium-driver``) and
selenium (``pip install -e .[test]``); without them the tests are skipped, saying so.
"""

from __future__ import annotations

import base64
import os
import random
import shutil
import tempfile
from pathlib import Path

import httpx
import pytest

from serving import running_server

MODEL_NAME = "tiny-shapes"
WAIT_S = 30
ROWS_JS = """
return Array.from(document.querySelectorAll('#results > li')).map(row => {
  const fill = row.querySelector('.fill'), track = row.querySelector('.track');
  return {
    cls: row.dataset.class, className: row.className,
    label: row.querySelector('.label').textContent,
    width: fill.style.width, pct: row.querySelector('.pct').textContent,
    fillPx: fill.getBoundingClientRect().width, trackPx: track.getBoundingClientRect().width,
  };
});
"""
STATE_JS = """
const status = document.getElementById('status');
return {top1: document.getElementById('top1').textContent, status: status.textContent, statusClass: status.className,
        bars: document.querySelectorAll('#results > li').length};
"""


def find_binary(name: str, fallback: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    return fallback if os.path.isfile(fallback) and os.access(fallback, os.X_OK) else None


# -- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser():
    """One headless Chromium for the module, started without Selenium Manager (no network)."""
    try:
        from selenium import webdriver
        from selenium.common.exceptions import WebDriverException
        from selenium.webdriver.chrome.service import Service
    except ImportError as exc:
        pytest.skip(f"selenium is not importable ({exc}): pip install 'selenium>=4.20' (or pip install -e .[test])")
    chromium = find_binary("chromium", "/usr/bin/chromium")
    chromedriver = find_binary("chromedriver", "/usr/bin/chromedriver")
    if chromium is None or chromedriver is None:
        missing = " and ".join(n for n, p in (("chromium", chromium), ("chromedriver", chromedriver)) if p is None)
        pytest.skip(f"no {missing} on PATH or in /usr/bin: apt-get install chromium chromium-driver")
    profile = tempfile.mkdtemp(prefix="imgrec-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
        "--disable-extensions", "--no-first-run", "--disable-sync", "--metrics-recording-only", "--mute-audio",
        f"--user-data-dir={profile}", "--window-size=1024,900",
    ):  # fmt: skip
        options.add_argument(flag)
    try:
        driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    except WebDriverException as exc:
        shutil.rmtree(profile, ignore_errors=True)
        pytest.skip(f"headless Chromium did not start ({chromium}, {chromedriver}): {exc.msg or exc}".strip())
    driver.set_page_load_timeout(WAIT_S)
    driver.set_script_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def served(classifier):
    from imgrec.serve import ServeConfig

    with running_server(classifier, ServeConfig(name=MODEL_NAME)) as (base_url, server):
        yield base_url, server


@pytest.fixture(scope="module")
def val_images(tiny_run) -> list[Path]:
    """Absolute paths of validation images, one per class first, then the rest."""
    val = tiny_run[1] / "val"
    by_class = [sorted(folder.glob("*.jpg")) for folder in sorted(val.iterdir()) if folder.is_dir()]
    assert len(by_class) == 3 and all(by_class)
    heads = [files[0] for files in by_class]
    rest = [f for files in by_class for f in files[1:]]
    return [p.resolve() for p in heads + rest]


@pytest.fixture
def page(browser, served):
    """The page freshly loaded in the module's browser: (driver, base URL)."""
    base_url, _ = served
    browser.get(base_url + "/")
    return browser, base_url


# -- helpers ----------------------------------------------------------------------------------
def choose_file(driver, path: Path) -> None:
    """Pick ``path`` with the page's hidden file input, as the file chooser would."""
    from selenium.common.exceptions import ElementNotInteractableException
    from selenium.webdriver.common.by import By

    field = driver.find_element(By.ID, "file")
    assert field.get_attribute("type") == "file"
    try:
        field.send_keys(str(path))
    except ElementNotInteractableException:  # chromedriver with strictFileInteractability: unhide it
        driver.execute_script("arguments[0].hidden = false", field)
        field.send_keys(str(path))


def wait_for(driver, condition, what: str):
    from selenium.webdriver.support.ui import WebDriverWait

    def check(d):
        state = d.execute_script(STATE_JS)
        return state if condition(state) else False

    return WebDriverWait(driver, WAIT_S, poll_frequency=0.05).until(check, message=what)


def wait_for_top1(driver) -> dict:
    state = wait_for(driver, lambda s: s["top1"] or s["statusClass"] == "error", "no top class shown")
    assert state["statusClass"] != "error", f"the page shows an error instead of a result: {state['status']!r}"
    return state


def wait_for_error(driver) -> dict:
    return wait_for(driver, lambda s: s["statusClass"] == "error" or s["top1"], "no error shown")


def check_result(driver, classifier, path: Path, name: str) -> str:
    """The top class and the bars on the page are ``classifier.predict(path)``'s, in order; returns the top class."""
    expected = classifier.predict(path, topk=5)[0]
    assert expected.error is None, expected.error
    state = wait_for_top1(driver)
    assert state["top1"] == expected.label
    assert state["status"].startswith(name + ": done"), state["status"]
    rows = driver.execute_script(ROWS_JS)
    assert len(rows) == min(5, len(classifier.classes)) == len(expected.labels) == 3
    assert [r["cls"] for r in rows] == expected.labels
    for row, label, prob in zip(rows, expected.labels, expected.probs):
        assert row["className"] == "bar"
        assert row["label"] == label  # no human-readable names in this model: the label is the class
        assert row["width"].endswith("%") and row["pct"].endswith("%"), row
        assert float(row["width"][:-1]) == pytest.approx(100 * prob, abs=0.051), (label, row, prob)
        assert float(row["pct"][:-1]) == pytest.approx(100 * prob, abs=0.051), (label, row, prob)
        assert row["trackPx"] > 100, row  # laid out, and the bar is drawn at its share of the track
        assert row["fillPx"] / row["trackPx"] == pytest.approx(prob, abs=0.01), (label, row, prob)
    return expected.label


def post_file(base_url: str, name: str, data: bytes) -> httpx.Response:
    """What the page's fetch sends: the file as multipart field ``file`` to ``predict?topk=5``."""
    return httpx.post(base_url + "/predict?topk=5", files={"file": (name, data, "image/jpeg")}, timeout=WAIT_S)


# -- tests ------------------------------------------------------------------------------------
def test_page_names_the_model(page):
    from selenium.webdriver.common.by import By

    driver, _ = page
    assert MODEL_NAME in driver.title
    assert MODEL_NAME in driver.find_element(By.TAG_NAME, "h1").text
    state = driver.execute_script(STATE_JS)
    assert state == {"top1": "", "status": "", "statusClass": "", "bars": 0}
    assert not driver.find_element(By.ID, "file").is_displayed()  # hidden: the label is the control
    assert driver.find_element(By.ID, "drop").is_displayed()


def test_chosen_file_shows_the_top_classes(page, classifier, val_images):
    driver, _ = page
    for path in val_images[:3]:  # one per class, each a fresh upload over the last one
        choose_file(driver, path)
        check_result(driver, classifier, path, path.name)


@pytest.mark.parametrize(
    "name, data, words",
    [
        ("x.jpg", random.Random(7).randbytes(4096), ["not an image"]),
        ("empty.jpg", b"", ["empty", "0 bytes"]),
        ("cut.jpg", None, ["truncated or corrupt"]),  # the first 300 bytes of a real JPEG
    ],
    ids=["random-bytes", "empty", "truncated"],
)
def test_bad_file_shows_the_server_error(page, classifier, val_images, tmp_path, name, data, words):
    driver, base_url = page
    if data is None:
        data = val_images[0].read_bytes()[:300]
    # a good image first, so that there are bars for the error to clear
    choose_file(driver, val_images[3])
    check_result(driver, classifier, val_images[3], val_images[3].name)

    answer = post_file(base_url, name, data)
    assert answer.status_code == 400, answer.text
    message = answer.json()["error"]
    assert all(w in message for w in words), message

    bad = tmp_path / name
    bad.write_bytes(data)
    choose_file(driver, bad)
    state = wait_for_error(driver)
    assert state["statusClass"] == "error", state
    assert message.startswith(f"{name}: ") and state["status"] == message  # the server names the uploaded file; the page shows it once
    assert state["top1"] == "" and state["bars"] == 0, state

    good = val_images[4]  # a valid upload after the error works, and the error goes away
    choose_file(driver, good)
    check_result(driver, classifier, good, good.name)
    assert driver.execute_script(STATE_JS)["statusClass"] == ""


def test_dropped_file_shows_the_top_classes(page, classifier, val_images):
    """A synthetic drag and drop: dragover marks the zone, the drop of a File classifies it."""
    driver, _ = page
    path = val_images[5]
    payload = base64.b64encode(path.read_bytes()).decode("ascii")
    result = driver.execute_script(
        """
        const [b64, name] = arguments, drop = document.getElementById('drop');
        const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], name, {type: 'image/jpeg'}));
        const fire = type => drop.dispatchEvent(new DragEvent(type, {bubbles: true, cancelable: true, dataTransfer: transfer}));
        const overNotCancelled = fire('dragover'), overClass = drop.classList.contains('over');
        const dropNotCancelled = fire('drop');
        return {overNotCancelled, overClass, dropNotCancelled, afterClass: drop.classList.contains('over'), files: transfer.files.length};
        """,
        payload,
        path.name,
    )
    assert result["files"] == 1
    assert result["overNotCancelled"] is False  # preventDefault on dragover: the browser allows the drop
    assert result["overClass"] is True
    assert result["dropNotCancelled"] is False  # preventDefault on drop: the browser does not open the file
    assert result["afterClass"] is False
    check_result(driver, classifier, path, path.name)


def test_drag_leave_and_empty_drop_change_nothing(page):
    driver, _ = page
    result = driver.execute_script(
        """
        const drop = document.getElementById('drop');
        const fire = (type, transfer) => drop.dispatchEvent(new DragEvent(type, {bubbles: true, cancelable: true, dataTransfer: transfer}));
        fire('dragover', new DataTransfer());
        const over = drop.classList.contains('over');
        fire('dragleave', new DataTransfer());
        const left = drop.classList.contains('over');
        fire('dragover', new DataTransfer());
        fire('drop', new DataTransfer());  // text or nothing dropped: no file, no request
        return {over, left, after: drop.classList.contains('over')};
        """
    )
    assert result == {"over": True, "left": False, "after": False}
    state = driver.execute_script(STATE_JS)
    assert state == {"top1": "", "status": "", "statusClass": "", "bars": 0}


def test_class_names_and_unusual_file_names(page, classifier, val_images, tmp_path, monkeypatch):
    """A model with human-readable names shows "name (class)"; data-class and #top1 stay the class."""
    driver, _ = page
    monkeypatch.setattr(classifier, "class_names", {"circle": "round <thing>", "square": "box & co", "triangle": "triangle"})
    path = tmp_path / "photo ü 1 (copy).jpg"
    path.write_bytes(val_images[6].read_bytes())
    expected = classifier.predict(path)[0]
    choose_file(driver, path)
    state = wait_for_top1(driver)
    assert state["top1"] == expected.label
    assert state["status"].startswith(path.name + ": done"), state["status"]
    rows = driver.execute_script(ROWS_JS)
    assert [r["cls"] for r in rows] == expected.labels
    names = dict(classifier.class_names)
    assert [r["label"] for r in rows] == [c if names[c] == c else f"{names[c]} ({c})" for c in expected.labels]


def test_model_name_is_shown_as_text(browser, classifier):
    from selenium.webdriver.common.by import By

    from imgrec.serve import ServeConfig

    name = "shapes <v2> & co"
    with running_server(classifier, ServeConfig(name=name)) as (base_url, _):
        browser.get(base_url + "/")
        assert browser.title == f"imgrec · {name}"
        assert browser.find_element(By.TAG_NAME, "h1").text == f"imgrec · {name}"


BOXES_JS = """
const box = sel => { const r = document.querySelector(sel).getBoundingClientRect();
                     return {left: r.left, top: r.top, right: r.right, bottom: r.bottom, width: r.width, height: r.height}; };
const preview = document.getElementById('preview');
return {h1: box('h1'), drop: box('#drop'), status: box('#status'), preview: box('#preview'), answer: box('#answer'),
        loaded: preview.complete && preview.naturalWidth > 0,
        scrollWidth: document.documentElement.scrollWidth, clientWidth: document.documentElement.clientWidth};
"""


def overlap(a: dict, b: dict) -> float:
    """The area two boxes share (0 where they only touch)."""
    return max(0.0, min(a["right"], b["right"]) - max(a["left"], b["left"])) * max(0.0, min(a["bottom"], b["bottom"]) - max(a["top"], b["top"]))


@pytest.mark.parametrize("width, height, beside", [(1000, 800, True), (420, 900, False)], ids=["desktop", "phone"])
def test_layout_keeps_heading_drop_zone_and_result_apart(page, classifier, val_images, tmp_path, width, height, beside):
    """With a result shown, heading, drop zone, status line, preview and answer each have their own
    place: no two boxes overlap, nothing runs past the window's width; the answer sits beside the
    preview on a wide window and under it on a narrow one. The screenshot is kept in tmp_path."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver, _ = page
    size = driver.get_window_size()
    driver.set_window_size(width, height)
    try:
        path = val_images[0]
        choose_file(driver, path)
        check_result(driver, classifier, path, path.name)
        boxes = WebDriverWait(driver, WAIT_S, poll_frequency=0.05).until(lambda d: (b := d.execute_script(BOXES_JS))["loaded"] and b, message="the preview never loaded")
        shot = tmp_path / f"serve-page-{width}x{height}.png"
        assert driver.save_screenshot(str(shot)) and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        driver.set_window_size(size["width"], size["height"])
    parts = ("h1", "drop", "status", "preview", "answer")
    for i, a in enumerate(parts):
        assert boxes[a]["width"] > 0 and boxes[a]["height"] > 0, (a, boxes[a])
        for b in parts[i + 1 :]:
            assert overlap(boxes[a], boxes[b]) == 0, f"{a} and {b} overlap at {width}x{height}: {boxes[a]} {boxes[b]} (screenshot {shot})"
    assert boxes["scrollWidth"] <= boxes["clientWidth"], boxes
    assert boxes["h1"]["bottom"] <= boxes["drop"]["top"] <= boxes["status"]["top"] <= boxes["preview"]["top"]
    if beside:
        assert boxes["answer"]["left"] >= boxes["preview"]["right"] and boxes["answer"]["top"] == pytest.approx(boxes["preview"]["top"], abs=1)
    else:
        assert boxes["answer"]["top"] >= boxes["preview"]["bottom"]


def test_show_where_it_looked_swaps_in_the_heatmap_and_back(page, classifier, val_images):
    """After an answer, the button fetches /explain and shows the heatmap PNG in the preview's
    place, naming the class; pressed again, it shows the image sent."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver, _ = page
    path = val_images[1]
    choose_file(driver, path)
    top = check_result(driver, classifier, path, path.name)
    button = driver.find_element(By.ID, "why")
    assert button.is_displayed() and button.text == "Show where it looked"
    sent = driver.execute_script("return document.getElementById('preview').src")
    button.click()
    WebDriverWait(driver, WAIT_S, poll_frequency=0.05).until(lambda d: "red is where" in d.execute_script(STATE_JS)["status"], message="no heatmap came")
    state = driver.execute_script(STATE_JS)
    shown = driver.execute_script("const p = document.getElementById('preview'); return {src: p.src, w: p.naturalWidth, done: p.complete};")
    assert shown["src"] != sent and shown["src"].startswith("blob:")
    assert state["status"] == f"{path.name}: red is where the evidence for {top} lies" and state["statusClass"] == ""
    assert button.text == "Show the image"
    button.click()
    assert driver.execute_script("return document.getElementById('preview').src") == sent and button.text == "Show where it looked"


def test_a_server_with_keys_asks_for_one_and_then_answers(browser, classifier, val_images):
    """Behind --api-key the page's first request gets a 401: the page shows the key field; with
    the key entered, the same image is classified."""
    from selenium.webdriver.common.by import By

    key = "page-test-key-0123456789"
    with running_server(classifier, api_keys=[key]) as (base_url, _):
        browser.get(base_url + "/")
        browser.execute_script("sessionStorage.clear()")
        form = browser.find_element(By.ID, "keyform")
        assert not form.is_displayed()
        path = val_images[2]
        choose_file(browser, path)
        state = wait_for_error(browser)
        assert "needs an API key" in state["status"] and form.is_displayed()
        browser.find_element(By.ID, "key").send_keys(key)
        form.find_element(By.TAG_NAME, "button").click()
        check_result(browser, classifier, path, path.name)
        assert not form.is_displayed()
