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
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from clearml_umem.catalog import write_manifest
from clearml_umem.spec import spec_from_mapping
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
    assert header.split()[:3] == ["MODEL", "TIER", "MOVING"]
    assert {line.split()[0] for line in rows[:3]} == {"tiny-llama", "tiny-mistral", "tiny-qwen2"}
    assert rows[-1].startswith("device ") and " of " in rows[-1]

    assert cli("place", "tiny-llama", "cold", *url).returncode == 0
    warm = cli("place", "tiny-llama", "gpu", *url)
    assert warm.returncode == 0, warm.stderr
    assert warm.stdout.startswith("tiny-llama: placed in gpu (")
    assert "  tiny-llama: cold -> gpu in " in warm.stdout and "GB/s)" in warm.stdout

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
    assert rows_by_name["tiny-llama"]["moves"] >= 2 and rows_by_name["tiny-qwen2"]["move"] is None
    placed = json.loads(cli("place", "tiny-qwen2", "ram", "--json", *url).stdout)
    assert placed["model"]["tier"] == "ram" and [m["dst"] for m in placed["moves"]] == ["ram"]


def test_exit_codes_a_script_can_rely_on(served: RouterProcess) -> None:
    wrong = cli("ps", "--url", served.url, "--admin-key", "wrong")
    assert wrong.returncode == 1 and "HTTP 401" in wrong.stderr and "API key" in wrong.stderr
    inference_only = cli("place", "tiny-llama", "gpu", "--url", served.url, "--api-key", API_KEY)
    assert inference_only.returncode == 1 and "HTTP 401" in inference_only.stderr, "admin routes take the admin key"
    missing = cli("place", "no-such-model", "gpu", "--url", served.url, "--admin-key", ADMIN_KEY)
    assert missing.returncode == 1 and "HTTP 404" in missing.stderr and "no-such-model" in missing.stderr
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


def test_the_status_page_in_a_browser_shows_the_models_and_follows_a_placement(served: RouterProcess,
                                                                                tmp_path: Path) -> None:
    chromium, driver_path = browser_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        browser.set_page_load_timeout(60)
        wait = WebDriverWait(browser, 60)
        browser.get(served.url + "/ui#key=" + ADMIN_KEY)

        def tier(model: str) -> str | None:
            rows = browser.find_elements(By.CSS_SELECTOR, f'#models tr[data-model="{model}"]')
            return rows[0].get_attribute("data-tier") if rows else None

        wait.until(lambda _: all(tier(m) for m in ("tiny-llama", "tiny-mistral", "tiny-qwen2")))
        assert "#key" not in browser.current_url, "the key does not stay in the address bar"
        memory = browser.find_element(By.CSS_SELECTOR, 'tr[data-budget="device"] .used').text
        assert re.fullmatch(r"\d+\.\d+ [MG]B of \d+\.\d+ [MG]B", memory), memory

        with admin(served) as client:
            client.post("/admin/models/tiny-llama/place", json={"tier": "cold"}).raise_for_status()
            wait.until(lambda _: tier("tiny-llama") == "cold")
            client.post("/admin/models/tiny-llama/place", json={"tier": "gpu"}).raise_for_status()
        wait.until(lambda _: tier("tiny-llama") == "gpu")
        moves = [row.text for row in browser.find_elements(By.CSS_SELECTOR, "#moves tbody tr")]
        assert any("tiny-llama" in text and "cold -> gpu" in text for text in moves), moves

        # a refused key brings up the key form; the right key typed in brings the data back
        browser.get(served.url + "/ui#key=wrong")
        form = browser.find_element(By.ID, "keyform")
        wait.until(lambda _: form.is_displayed())
        assert "refused" in browser.find_element(By.ID, "status").text
        browser.find_element(By.ID, "key").send_keys(ADMIN_KEY)
        form.find_element(By.TAG_NAME, "button").click()
        wait.until(lambda _: not form.is_displayed() and tier("tiny-llama") == "gpu")
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
