"""The operator's view against the real router on loopback: the CLI through its entry point
(`clearml-umem ps | place | logs`), the status page in a real headless Chromium, the start
banner and the warning for a listener off loopback without a key."""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from clearml_umem.catalog import write_manifest
from clearml_umem.spec import spec_from_mapping
from clearml_umem.units import fmt_bytes
from tests.routerproc import RouterProcess, start_room_for_one, start_router

pytestmark = pytest.mark.slow

API_KEY = "inference-key"
ADMIN_KEY = "admin-key"
LOG_WAIT_S = 120


@pytest.fixture(scope="module")
def served(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[RouterProcess]:
    router, _ = start_room_for_one(tiny_models, tmp_path_factory.mktemp("ops"),
                                   env={"UMEM_API_KEY": API_KEY, "UMEM_ADMIN_KEY": ADMIN_KEY})
    yield router
    router.kill()


def entry_point() -> list[str]:
    """The `clearml-umem` console script of this environment, as an operator runs it."""
    script = Path(sys.executable).parent / "clearml-umem"
    return [str(script)] if script.exists() else [sys.executable, "-m", "clearml_umem"]


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("UMEM_API_KEY", "UMEM_ADMIN_KEY", "UMEM_ROUTER_URL")}
    return {**env, **extra}


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*entry_point(), *args], capture_output=True, text=True, timeout=300,
                          env=env if env is not None else cli_env())


def admin(router: RouterProcess) -> httpx.Client:
    return httpx.Client(base_url=router.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=300)


def test_ps_and_place_tell_what_sits_where_and_what_moved(served: RouterProcess) -> None:
    url = ["--url", served.url, "--admin-key", ADMIN_KEY]
    ps = cli("ps", *url)
    assert ps.returncode == 0, ps.stderr
    header, *rows = ps.stdout.splitlines()
    assert header.split()[:7] == ["MODEL", "TIER", "PROCESSOR", "SIZE", "ENGINE", "CONTEXT", "MOVING"]
    assert "UNTIL" in header.split()
    assert {line.split()[0] for line in rows[:3]} == {"tiny-llama", "tiny-mistral", "tiny-qwen2"}
    assert rows[-1].startswith("device (cpu) ") and " of " in rows[-1], "the device is named truthfully"

    assert cli("place", "tiny-llama", "cold", *url).returncode == 0
    warm = cli("place", "tiny-llama", "gpu", *url)
    assert warm.returncode == 0, warm.stderr
    assert warm.stdout.startswith("tiny-llama: placed in gpu (")
    assert "  tiny-llama: cold -> gpu in " in warm.stdout and "B/s)" in warm.stdout

    # room for one: warming another moves tiny-llama off the device, and the output says so
    other = cli("place", "tiny-qwen2", "gpu", *url)
    assert other.returncode == 0, other.stderr
    moved = other.stdout.splitlines()[1:]
    assert any(line.startswith("  tiny-llama: gpu -> ") for line in moved), other.stdout
    assert any(line.startswith("  tiny-qwen2: ") and " -> gpu in " in line for line in moved), other.stdout

    again = cli("place", "tiny-qwen2", "gpu", *url)
    assert again.returncode == 0 and again.stdout.startswith("tiny-qwen2: already in gpu")

    data = json.loads(cli("ps", "--json", *url).stdout)
    rows_by_name = {row["name"]: row for row in data["data"]}
    assert rows_by_name["tiny-qwen2"]["tier"] == "gpu" and rows_by_name["tiny-llama"]["tier"] != "gpu"
    assert data["device"] == "cpu" and rows_by_name["tiny-qwen2"]["processor"] == "100% CPU"
    hot = next(line for line in cli("ps", *url).stdout.splitlines() if line.startswith("tiny-qwen2 "))
    assert hot.split()[1:7] == ["gpu", "100%", "CPU", *_size_words(rows_by_name["tiny-qwen2"]["size_bytes"]),
                                "transformers"], hot
    assert " forever " in hot, "no keep-alive: a hot model stays until it must make room"
    assert rows_by_name["tiny-llama"]["moves"] >= 2 and rows_by_name["tiny-qwen2"]["move"] is None
    placed = json.loads(cli("place", "tiny-qwen2", "ram", "--json", *url).stdout)
    assert placed["model"]["tier"] == "ram" and [m["dst"] for m in placed["moves"]] == ["ram"]


def _size_words(n: int) -> list[str]:
    return fmt_bytes(n).split()


def test_exit_codes_a_script_can_rely_on(served: RouterProcess) -> None:
    wrong = cli("ps", "--url", served.url, "--admin-key", "wrong")
    assert wrong.returncode == 1 and "HTTP 401" in wrong.stderr and "API key" in wrong.stderr
    assert "--admin-key" in wrong.stderr and "UMEM_ADMIN_KEY" in wrong.stderr and "UMEM_API_KEY" in wrong.stderr, \
        "a refused key says what to type, not which header to send"
    assert "Authorization" not in wrong.stderr
    inference_only = cli("place", "tiny-llama", "gpu", "--url", served.url, "--api-key", API_KEY)
    assert inference_only.returncode == 1 and "HTTP 401" in inference_only.stderr, "admin routes take the admin key"
    missing = cli("place", "no-such-model", "gpu", "--url", served.url, "--admin-key", ADMIN_KEY)
    assert missing.returncode == 1 and "HTTP 404" in missing.stderr and "no-such-model" in missing.stderr
    assert "clearml-umem ps" in missing.stderr and "GET /v1/models" not in missing.stderr
    not_a_router = cli("ps", "--url", served.url + "/elsewhere", "--admin-key", ADMIN_KEY)
    assert not_a_router.returncode == 1 and "is it a clearml-umem router" in not_a_router.stderr
    wrong_scheme = cli("ps", "--url", "ftp://127.0.0.1:1")
    assert wrong_scheme.returncode == 2 and "http or https" in wrong_scheme.stderr
    usage = cli("place", "tiny-llama", "vram", "--url", served.url)
    assert usage.returncode == 2 and "invalid choice" in usage.stderr
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        free_port = sock.getsockname()[1]
    down = cli("ps", "--url", f"http://127.0.0.1:{free_port}")
    assert down.returncode == 3 and "cannot reach the router" in down.stderr
    # the same conventions as an OpenAI client: URL and key from the environment
    from_env = cli("ps", env=cli_env(UMEM_ROUTER_URL=served.url, UMEM_ADMIN_KEY=ADMIN_KEY))
    assert from_env.returncode == 0, from_env.stderr


def test_the_url_takes_the_forms_users_type(served: RouterProcess) -> None:
    """An OpenAI base URL (what clients are configured with) and a bare host:port both reach the router."""
    bare = served.url.removeprefix("http://")
    for url in (served.url + "/v1", served.url + "/v1/", bare, served.url + "/"):
        ps = cli("ps", "--url", url, "--admin-key", ADMIN_KEY)
        assert ps.returncode == 0 and ps.stdout.startswith("MODEL "), (url, ps.stderr)
    from_env = cli("ps", env=cli_env(UMEM_ROUTER_URL=served.url + "/v1", UMEM_ADMIN_KEY=ADMIN_KEY))
    assert from_env.returncode == 0, from_env.stderr


def test_every_command_has_help_with_defaults_variables_and_examples() -> None:
    version = cli("--version")
    assert version.returncode == 0 and re.fullmatch(r"clearml-umem \d+\.\d+\.\d+\n", version.stdout)
    top = cli("--help").stdout
    assert all(name in top for name in ("serve", "demo", "ps", "place", "logs", "UMEM_ROUTER_URL"))
    serve = cli("serve", "--help").stdout
    for needle in ("UMEM_API_KEY", "UMEM_ADMIN_KEY", "UMEM_KEEP_ALIVE", "--keep-alive", "--no-access-log",
                   "(lru, cost)", "(default: 8000)", "examples:", "clearml-umem serve --manifest"):
        assert needle in serve, needle
    for command, needles in {"ps": ("UNTIL", "PROCESSOR", "clearml-umem ps --url"),
                             "place": ("{gpu,ram,disk,cold}", "clearml-umem place qwen gpu"),
                             "logs": ("--follow", "next_offset", "clearml-umem logs qwen -f"),
                             "demo": ("--keep-serving", "(default: transformers)", "examples:")}.items():
        text = cli(command, "--help", env=cli_env(UMEM_API_KEY="secret-in-env", UMEM_ADMIN_KEY="admin-in-env")).stdout
        for needle in (*needles, *(("UMEM_ROUTER_URL", "UMEM_ADMIN_KEY") if command != "demo" else ())):
            assert needle in text, (command, needle)
        assert "secret-in-env" not in text and "admin-in-env" not in text, "help never prints a key"


def test_a_request_is_logged_once_and_its_keep_alive_moves_the_model_down(served: RouterProcess) -> None:
    url = ["--url", served.url, "--admin-key", ADMIN_KEY]
    assert cli("place", "tiny-mistral", "gpu", *url).returncode == 0
    body = {"model": "tiny-mistral", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2,
            "temperature": 0}
    with httpx.Client(base_url=served.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=300) as client:
        client.post("/v1/chat/completions", json={**body, "keep_alive": "10m"}).raise_for_status()
        ps = cli("ps", *url).stdout
        row = next(line for line in ps.splitlines() if line.startswith("tiny-mistral "))
        assert re.search(r" in (59\d|600) s | in 10 min ", row), row
        # keep_alive 0 (Ollama's "unload now"): it moves down as soon as the request ends, a tier per step
        client.post("/v1/chat/completions", json={**body, "keep_alive": 0}).raise_for_status()
    with admin(served) as admin_client:
        deadline = time.monotonic() + LOG_WAIT_S
        while time.monotonic() < deadline:
            rows = {r["name"]: r for r in admin_client.get("/admin/models").json()["data"]}
            if rows["tiny-mistral"]["tier"] == "disk":
                break
            time.sleep(0.1)
    assert rows["tiny-mistral"]["tier"] == "disk", rows["tiny-mistral"]
    lines = [line for line in served.log if "clearml_umem.access" in line and "model=tiny-mistral " in line]
    assert len(lines) >= 2 and all("POST /v1/chat/completions" in line and "status=200" in line for line in lines)
    assert re.search(r"from=gpu ttft=\d+\.\d+s tokens_in=\d+ tokens_out=\d+ duration=\d+\.\d+s", lines[-1]), lines[-1]
    for step in ("gpu -> ram", "ram -> disk"):
        assert any(f"model tiny-mistral: {step}: unused for" in line and "keep_alive 0 s" in line
                   for line in served.log), f"the log says why it moved ({step})"
    assert not any("httpx" in line for line in served.log), "internal HTTP calls stay out of the log"


def test_logs_print_and_follow_a_models_lines(served: RouterProcess) -> None:
    url = ["--url", served.url, "--admin-key", ADMIN_KEY]
    assert cli("place", "tiny-mistral", "gpu", *url).returncode == 0
    logs = cli("logs", "tiny-mistral", *url)
    assert logs.returncode == 0, logs.stderr
    assert "model tiny-mistral: " in logs.stdout and " -> gpu in " in logs.stdout
    assert "runs inside the router" in logs.stderr, "says where the lines come from"
    assert "tiny-llama" not in logs.stdout
    with admin(served) as client:
        bad = client.get("/admin/models/tiny-mistral/logs", params={"offset": "-1"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "offset"

    follower = subprocess.Popen([*entry_point(), "logs", "tiny-mistral", "-f", *url], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=cli_env())
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert follower.stdout is not None
        for line in follower.stdout:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    try:
        lines.get(timeout=LOG_WAIT_S)  # the lines so far: it is following now
        with admin(served) as client:
            client.post("/admin/models/tiny-mistral/place", json={"tier": "disk"}).raise_for_status()
        while True:
            line = lines.get(timeout=LOG_WAIT_S)
            if "tiny-mistral: gpu -> disk" in line or "tiny-mistral: ram -> disk" in line:
                break
        assert follower.poll() is None, "still following"
    finally:
        follower.terminate()
        follower.wait(timeout=30)


def browser_or_skip() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("Chromium and chromedriver are not installed (apt-get install chromium chromium-driver; "
                    "scripts/test.sh installs them when run as root)")
    pytest.importorskip("selenium", reason="selenium is not installed (pip install -e 'plugin[test]')")
    return chromium, driver


def test_the_status_page_shell_is_public_and_its_data_is_not(served: RouterProcess) -> None:
    page = httpx.get(served.url + "/ui", timeout=30)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<table id="models">' in page.text and "tiny-llama" not in page.text, "the shell carries no data"
    assert "http://" not in page.text and "https://" not in page.text, "no external assets"
    assert httpx.get(served.url + "/", timeout=30).text == page.text
    assert httpx.get(served.url + "/admin/status", timeout=30).status_code == 401
    inference = httpx.get(served.url + "/admin/status", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    assert inference.status_code == 401, "the admin key guards the admin data"


def open_browser(tmp_path: Path, width: int, height: int) -> Any:
    """Headless Chromium showing `width` x `height` CSS pixels (a phone's too: the window itself cannot be
    narrower than 500 px headless, so the viewport is set as DevTools' device mode sets it)."""
    chromium, driver_path = browser_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / f'chromium-{width}'}"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    browser.set_page_load_timeout(60)
    viewport(browser, width, height)
    return browser


def viewport(browser: Any, width: int, height: int) -> None:
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 700})


def screenshot(browser: Any, tmp_path: Path, name: str) -> Path:
    """A full-page screenshot, kept in UMEM_TEST_SCREENSHOTS when set (to look at it), else in tmp_path."""
    folder = Path(os.environ.get("UMEM_TEST_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    width, height = browser.execute_script("return [window.innerWidth, window.innerHeight]")
    full = browser.execute_script("return document.documentElement.scrollHeight")
    viewport(browser, width, min(6000, full))
    path = folder / f"status-{name}.png"
    assert browser.save_screenshot(str(path))
    viewport(browser, width, height)
    return path


def test_the_status_page_in_a_browser_shows_the_models_and_follows_a_placement(served: RouterProcess,
                                                                                tmp_path: Path) -> None:
    browser = open_browser(tmp_path, 1280, 900)
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    with httpx.Client(base_url=served.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=300) as client:
        client.post("/v1/chat/completions", json={"model": "tiny-qwen2", "max_tokens": 2,
                                                  "messages": [{"role": "user", "content": "hi"}]}).raise_for_status()
    try:
        wait = WebDriverWait(browser, 60)
        browser.get(served.url + "/ui#key=" + ADMIN_KEY)

        def tier(model: str) -> str | None:
            return browser.execute_script(
                "const row = document.querySelector('#models tr[data-model=\"' + arguments[0] + '\"]');"
                " return row ? row.dataset.tier : null;", model)

        wait.until(lambda _: all(tier(m) for m in ("tiny-llama", "tiny-mistral", "tiny-qwen2")))
        assert "#key" not in browser.current_url, "the key does not stay in the address bar"
        memory = browser.find_element(By.CSS_SELECTOR, '[data-used="device"]').text
        assert re.fullmatch(r"\d+(\.\d+)? [KMG]B of \d+(\.\d+)? [KMG]B", memory), memory
        row = browser.find_element(By.CSS_SELECTOR, '#models tr[data-model="tiny-qwen2"]').text
        assert "transformers" in row and "100% CPU" in row, "the model's facts: engine, size, context, processor"

        with admin(served) as client:
            client.post("/admin/models/tiny-llama/place", json={"tier": "cold"}).raise_for_status()
            wait.until(lambda _: tier("tiny-llama") == "cold")
            client.post("/admin/models/tiny-llama/place", json={"tier": "gpu"}).raise_for_status()
        wait.until(lambda _: tier("tiny-llama") == "gpu")
        moves = [row.text for row in browser.find_elements(By.CSS_SELECTOR, "#moves tbody tr")]
        assert any("tiny-llama" in text and "cold -> gpu" in text for text in moves), moves

        # the device bar is made of the models' holdings: the hot model's segment is there
        segments = browser.execute_script(
            "return Array.from(document.querySelectorAll('[data-budget=\"device\"] .seg'), (s) => s.dataset.model);")
        assert "tiny-llama" in segments, segments
        wait.until(lambda _: browser.find_elements(By.CSS_SELECTOR, "#moveschart svg rect.move"))
        assert browser.find_elements(By.CSS_SELECTOR, "#ttftchart svg rect[data-tier]"), "TTFT by tier chart"

        # a button places a model (with the admin key the page holds)
        # ... and the button stays the same element across polls: a row rebuilt each poll would lose a click
        # made between the press and the release (and this element would be stale)
        button = browser.find_element(By.CSS_SELECTOR, '#models tr[data-model="tiny-llama"] button[data-tier="ram"]')
        updates = browser.execute_script("return Number(document.body.dataset.updates || 0)")
        wait.until(lambda _: browser.execute_script("return Number(document.body.dataset.updates)") >= updates + 2)
        button.click()
        wait.until(lambda _: tier("tiny-llama") == "ram")
        wait.until(lambda _: "tiny-llama placed in ram" in browser.find_element(By.ID, "action").text)

        # the log panel follows a model's lines
        Select(browser.find_element(By.ID, "logmodel")).select_by_value("tiny-llama")
        wait.until(lambda _: "model tiny-llama: gpu -> ram" in browser.find_element(By.ID, "log").text)
        screenshot(browser, tmp_path, "desktop")

        # empty tables say so (rendered from an empty router's answer)
        texts = browser.execute_script(
            "render({device: 'cpu', memory: {device_used: 0, device_budget: 1e9, host_used: 0, host_budget: 1e9},"
            " models: [], moves: [], ttft_by_tier: {}});"
            " return ['#models', '#moves', '#ttft', '#ttftchart', '#moveschart']"
            ".map((s) => document.querySelector(s).innerText);")
        assert "no models" in texts[0] and "no moves yet" in texts[1] and "no requests yet" in texts[2]
        assert "no requests yet" in texts[3] and "no moves yet" in texts[4]

        # a refused key brings up the key form, and no bar pretends to be full
        browser.get(served.url + "/ui#key=wrong")
        form = browser.find_element(By.ID, "keyform")
        wait.until(lambda _: form.is_displayed())
        assert "refused" in browser.find_element(By.ID, "status").text
        for which in ("device", "host"):
            bar = browser.find_element(By.CSS_SELECTOR, f'[data-budget="{which}"] .bar')
            assert "nodata" in bar.get_attribute("class") and not bar.find_elements(By.CSS_SELECTOR, ".seg")
        assert "no data" in browser.find_element(By.CSS_SELECTOR, '[data-used="device"]').text
        assert "no data: the key was refused" in browser.find_element(By.CSS_SELECTOR, "#models tbody").text, \
            "nothing shown before stays as if it were current"
        screenshot(browser, tmp_path, "refused-key")
        browser.find_element(By.ID, "key").send_keys(ADMIN_KEY)
        form.find_element(By.TAG_NAME, "button").click()
        wait.until(lambda _: not form.is_displayed() and tier("tiny-llama") == "ram")
    finally:
        browser.quit()


def test_the_status_page_works_at_phone_width(served: RouterProcess, tmp_path: Path) -> None:
    browser = open_browser(tmp_path, 390, 844)
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        wait = WebDriverWait(browser, 60)
        browser.get(served.url + "/ui#key=" + ADMIN_KEY)
        wait.until(lambda _: len(browser.find_elements(By.CSS_SELECTOR, "#models tr[data-model]")) == 3)
        width = browser.execute_script("return window.innerWidth")
        assert width <= 400
        overflow = browser.execute_script("return document.documentElement.scrollWidth")
        assert overflow <= width + 1, f"the page scrolls sideways at phone width ({overflow} > {width})"
        # every model is a card whose facts, memory, expiry and buttons are on screen
        for cell in browser.find_elements(By.CSS_SELECTOR, '#models tr[data-model="tiny-qwen2"] td'):
            box = cell.rect
            assert box["x"] >= 0 and box["x"] + box["width"] <= width + 1, (cell.text, box)
        labels = browser.execute_script(
            "return Array.from(document.querySelectorAll('#models tr[data-model] td'))"
            ".map((td) => getComputedStyle(td, '::before').content);")
        assert '"until"' in labels and '"engine"' in labels, "each value carries its label on a card"
        bar = browser.find_element(By.CSS_SELECTOR, '[data-budget="device"] .bar').rect
        assert bar["x"] + bar["width"] <= width + 1
        screenshot(browser, tmp_path, "phone")
    finally:
        browser.quit()


def test_start_warns_when_listening_off_loopback_without_a_key(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    manifest = tmp_path / "models.yaml"
    write_manifest(manifest, [spec_from_mapping({"name": "tiny-llama", "weights": str(tiny_models["tiny-llama"])})])
    router = start_router(manifest, tmp_path / "work", "--host", "0.0.0.0", "--device", "cpu",
                          env={"UMEM_API_KEY": "", "UMEM_ADMIN_KEY": ""})
    try:
        log = "\n".join(router.log)
    finally:
        router.stop()
    warning = next(line for line in router.log if "without UMEM_API_KEY or UMEM_ADMIN_KEY" in line)
    assert "WARNING" in warning and "0.0.0.0" in warning
    assert "/v1/chat/completions" in warning and "/admin/models/NAME/place" in warning, "names what is exposed"
    assert "tiny-llama: transformers" in log
    assert "device budget: " in log and "detected: 25% of the " in log, "says how the budget was chosen"
    assert "host budget: " in log and "policy: lru" in log


def test_the_banner_of_a_keyed_loopback_router_says_so_without_a_warning(served: RouterProcess) -> None:
    log = "\n".join(served.log)
    assert "without UMEM_API_KEY" not in log
    assert "device budget: " in log and "(given)" in log
    assert "keys: API key set, admin key set" in log


@pytest.mark.parametrize(("host", "api_key", "admin_key", "exposed"), [
    ("127.0.0.1", None, None, None),
    ("::1", None, None, None),
    ("localhost", None, None, None),
    ("0.0.0.0", "k", None, None),
    ("0.0.0.0", None, "a", "inference"),
    ("10.1.2.3", None, None, "inference and admin"),
])
def test_the_warning_names_what_is_exposed(host: str, api_key: str | None, admin_key: str | None,
                                           exposed: str | None) -> None:
    from clearml_umem.banner import exposure_warning

    warning = exposure_warning(host, 8000, api_key, admin_key)
    if exposed is None:
        assert warning is None
        return
    assert warning is not None and f"{host}:8000" in warning and "/v1/chat/completions" in warning
    assert ("/admin/models/NAME/place" in warning) == (exposed == "inference and admin")
