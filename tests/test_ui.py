"""The dashboard as a user sees it: a real headless Chromium (driven by Selenium, with the Debian
packages' browser and driver) opens `swarm ui` while a real swarm trains: an SN, a SWOP whose three
nodes train a tiny classifier that measures every merged model on its own validation data, and the
SWCI init script that assigns the task and waits for it.
One swarm and one browser for the module; the tests run in file order, following the run.

Screenshots of every page land in the module's output folder; with SWARM_UPDATE_SCREENSHOTS=1 they
are also copied to docs/img/ for the README (a test run leaves the tracked files alone otherwise)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import Procs, RunningSN, identity, identity_args, start_sn, wait_until
from swarm_harness import start_sl
from swarmlearn.sn.client import SNClient
from test_swop_swci import make_project, run_swci, start_swop

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
DOCS_IMG = Path(__file__).resolve().parent.parent / "docs" / "img"
NODES = ["node1", "node2", "node3"]


class Run:
    """The module's swarm, dashboard and SWCI run in the background (its result once it ended)."""

    def __init__(self, procs: Procs, sn: RunningSN, url: str, usr: Path, shots: Path):
        self.procs, self.sn, self.url, self.usr, self.shots = procs, sn, url, usr, shots
        self.swci: subprocess.CompletedProcess | None = None


def start_ui(procs: Procs, certs, sn: RunningSN, *extra: str) -> tuple[str, str]:
    """Starts `swarm ui` on an OS-chosen port; returns its URL and its ready line."""
    proc = procs.swarm("ui", "--sn-ip", sn.address, *identity_args(certs, "ui"), "--port", "0", *extra)
    line = proc.wait_for_line("swarm ui ready on ")
    return line.split("swarm ui ready on ")[1].split()[0], line


# The nodes' model.py: the tiny classifier that gives validation data, so every merged model is
# measured, with each step made slower (as a bigger model's would be) so that rounds merge over
# several seconds, for the page to follow.
VALIDATED_MODEL = Path(__file__).resolve().parent / "ml" / "tiny_validated_model.py"
SLOWED_MODEL = f"""\
import os, runpy, time

import swarmlearn.torch


class SlowerSteps(swarmlearn.torch.SwarmCallback):
    def on_batch_end(self, *args, **kwargs):
        super().on_batch_end(*args, **kwargs)
        time.sleep(float(os.environ["STEP_SLEEP"]))


swarmlearn.torch.SwarmCallback = SlowerSteps  # what the model imports when it starts
runpy.run_path({str(VALIDATED_MODEL)!r}, run_name="__main__")
"""
STEPS, SYNC_FREQUENCY = 16, 4


def validated_and_slower(usr: Path) -> None:
    """The project's nodes train the validated model for STEPS steps of 0.4 s each."""
    (usr / "model" / "model.py").write_text(SLOWED_MODEL)
    profile = usr / "swop" / "swop_profile.yaml"
    text = profile.read_text().replace('STEPS: "8", SYNC_FREQUENCY : "4"',
                                       f'STEPS: "{STEPS}", SYNC_FREQUENCY : "{SYNC_FREQUENCY}", STEP_SLEEP: "0.4"')
    assert 'STEP_SLEEP' in text, "test_swop_swci's profile changed: update validated_and_slower"
    profile.write_text(text)


@pytest.fixture(scope="module")
def run(certs, tmp_path_factory):
    work = tmp_path_factory.mktemp("ui")
    procs = Procs()
    try:
        sn = start_sn(procs, certs, work / "sn")
        url, _ = start_ui(procs, certs, sn)
        usr = make_project(work, certs)
        validated_and_slower(usr)
        start_swop(procs, certs, sn, usr)
        current = Run(procs, sn, url, usr, work / "screenshots")
        current.shots.mkdir()

        def swci() -> None:
            current.swci = run_swci(certs, sn, usr)

        worker = threading.Thread(target=swci, daemon=True)
        worker.start()
        yield current
        worker.join(timeout=200)
    finally:
        procs.stop_all()


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.fail("Chromium and its driver are missing: run scripts/setup-system.sh (apt-get install chromium "
                    "chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,800", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    # The driver's path given: Selenium Manager (which downloads drivers) is never asked.
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        viewport(driver, 1280, 800)
        yield driver
    finally:
        driver.quit()


def viewport(driver, width: int, height: int) -> None:
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600})


def screenshot(driver, run: Run, name: str) -> None:
    path = run.shots / f"{name}.png"
    driver.save_screenshot(str(path))
    if os.environ.get("SWARM_UPDATE_SCREENSHOTS") == "1":
        DOCS_IMG.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, DOCS_IMG / path.name)


def rows(driver) -> list[str]:
    return driver.execute_script("return [...document.querySelectorAll('#main tbody tr')].map(r => r.innerText)")


def row_of(driver, name: str) -> str:
    return next((r for r in rows(driver) if r.split()[0] == name), "")


def wait_swci(run: Run, timeout: float = 180) -> subprocess.CompletedProcess:
    assert wait_until(lambda: run.swci is not None, timeout, every=0.5), "the SWCI script did not end"
    assert run.swci.returncode == 0, run.swci.stdout + run.swci.stderr
    return run.swci


def test_the_swarm_page_shows_the_sn_the_operator_and_the_training_nodes(run, browser):
    browser.get(run.url)
    seen_up: set[str] = set()

    def all_seen_up() -> bool:
        seen_up.update(n for n in NODES if "\tup\t" in row_of(browser, n))
        return seen_up == set(NODES) and bool(row_of(browser, "swop-1"))

    assert wait_until(all_seen_up, 90, every=0.1), rows(browser)
    assert "serving this dashboard" in row_of(browser, "sn-1")
    # An SN heartbeats to no one: its heartbeat is when it last answered the dashboard's own question.
    assert wait_until(lambda: " s ago" in row_of(browser, "sn-1"), 5, every=0.1), row_of(browser, "sn-1")
    screenshot(browser, run, "ui-swarm")


def test_rounds_appear_on_the_training_page_as_they_merge(run, browser):
    browser.get(run.url + "training")
    seen: list[int] = []

    def merged() -> int:
        counts = browser.execute_script("return [...document.querySelectorAll('.merged-count')]"
                                        ".map(e => Number(e.textContent))")
        return max(counts, default=0)

    loaded_at = browser.execute_script("return performance.timeOrigin")
    while run.swci is None:
        count = merged()
        if not seen or count != seen[-1]:
            seen.append(count)
        time.sleep(0.1)
    wait_swci(run)
    # Train begin, steps 4, 8, 12 and 16, train end.
    assert wait_until(lambda: merged() >= 2 + STEPS // SYNC_FREQUENCY, 10, every=0.2)
    seen.append(merged())
    # One page load (no reload: the page's time origin is the same), and the count grew on it.
    assert browser.execute_script("return performance.timeOrigin") == loaded_at
    assert len(set(seen)) >= 3, f"merged counts seen on the page: {seen}"
    screenshot(browser, run, "ui-training")


def chart_points(browser, kind: str, contract: str) -> dict[str, list[tuple]]:
    """Each trace of the page's `kind` chart of `contract` as its (x, y) points, by trace name."""
    figure = browser.execute_script(
        "const d = [...document.querySelectorAll('.chart')].find(c => c.dataset.kind === arguments[0] && "
        "c.dataset.contract === arguments[1]); return d && d.data ? d.data.map(t => [t.name, t.x, t.y]) : null",
        kind, contract)
    return {name: list(zip(x, y)) for name, x, y in figure or []}


def test_each_node_has_a_loss_point_per_sync_and_a_validation_point_per_merged_model(run, browser, certs):
    wait_swci(run)
    with SNClient(run.sn.address, identity(certs, "ui")) as client:
        contracts = client.query("contracts")["contracts"]
        (name,) = [n for n, c in contracts.items() if c["rounds"]]
        entries, _ = client.metrics(name)
    merged = sorted(int(n) for n, r in contracts[name]["rounds"].items() if r["status"] == "merged")
    recorded = {(kind, node): [(e["round"], e[value]) for e in entries if e["node"] == node and e["kind"] == kind]
                for kind, value in (("train", "loss"), ("validation", "metric")) for node in NODES}

    def shown_as_recorded() -> bool:
        loss, metric = chart_points(browser, "loss", name), chart_points(browser, "metric", name)
        return all(loss.get(n) == recorded["train", n] and metric.get(n) == recorded["validation", n] for n in NODES)

    browser.get(run.url + "training")
    assert wait_until(shown_as_recorded, 10, every=0.2), (chart_points(browser, "loss", name),
                                                          chart_points(browser, "metric", name), recorded)
    assert len(merged) == 2 + STEPS // SYNC_FREQUENCY, merged
    for node in NODES:
        # Every merged model is measured on the node but the first: at train begin its sync only loads
        # the swarm's starting model. So a validation curve has one point fewer than there are rounds.
        assert [r for r, _ in recorded["validation", node]] == merged[1:], (node, recorded)
        # The loss is of the steps each sync contributed (4, 8, 12, 16): none at train begin, none in
        # the final round, which no step preceded.
        assert [r for r, _ in recorded["train", node]] == merged[1:-1], (node, recorded)
    axis = browser.execute_script("return document.querySelector('.chart').layout.xaxis.title.text")
    assert axis == "merged round"

    # The Swarm page shows each node's latest loss and latest validation metric side by side.
    browser.get(run.url)
    for node in NODES:
        train_round, loss = recorded["train", node][-1]
        validation_round, accuracy = recorded["validation", node][-1]
        latest = f"loss {loss:.4g} (round {train_round}) · accuracy {accuracy:.4g} (round {validation_round})"
        assert wait_until(lambda: latest in row_of(browser, node), 5, every=0.1), (latest, row_of(browser, node))


def test_the_tasks_page_shows_the_task_complete(run, browser):
    wait_swci(run)
    browser.get(run.url + "tasks")
    text = lambda: browser.find_element("id", "main").text  # noqa: E731
    assert wait_until(lambda: "task run_task with 3 peers COMPLETE" in text(), 10, every=0.2), text()
    assert "build_user_env" in text() and "swop-1" in text()
    screenshot(browser, run, "ui-tasks")


def test_the_ledger_page_shows_the_chain_verification(run, browser):
    browser.get(run.url + "ledger")
    verdict = lambda: browser.execute_script(  # noqa: E731
        "const v = document.querySelector('.verify'); return v ? v.textContent : ''")
    assert wait_until(lambda: verdict().startswith("OK "), 10, every=0.2), browser.find_element("id", "main").text
    assert int(verdict().split()[1]) > 0
    assert rows(browser)[-1].split()[:2] != []  # entries are listed
    assert any(r.split()[1] == "genesis" for r in rows(browser)) or "2" in browser.find_element("id", "main").text
    screenshot(browser, run, "ui-ledger")


def test_a_killed_node_shows_as_gone_within_seconds(run, browser, certs, tmp_path):
    node = start_sl(run.procs, certs, run.sn, "node4", tmp_path)
    browser.get(run.url)
    assert wait_until(lambda: "\tup\t" in row_of(browser, "node4"), 15, every=0.1), rows(browser)
    node.sl.kill(signal.SIGKILL)
    killed = time.monotonic()
    assert wait_until(lambda: "gone" in row_of(browser, "node4"), 8, every=0.1), rows(browser)
    assert time.monotonic() - killed < 6


def test_the_training_page_reads_at_phone_width(run, browser):
    viewport(browser, 390, 844)
    try:
        browser.get(run.url + "training")
        assert wait_until(lambda: browser.execute_script(
            "return document.querySelectorAll('.chart .main-svg').length > 0"), 10, every=0.2)
        overflow = browser.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, f"the page is {overflow} px wider than a phone screen"
        screenshot(browser, run, "ui-training-phone")
    finally:
        viewport(browser, 1280, 800)


def test_with_a_token_a_browser_without_it_is_refused_and_with_it_gets_in(run, browser, certs):
    url, line = start_ui(run.procs, certs, run.sn, "--require-token")
    login = line.split("login: ")[1].strip()
    browser.get(url)
    assert "401" in browser.find_element("tag name", "body").text
    for path in ("", "training", "events?page=swarm", "static/plotly.min.js"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(url + path, timeout=5)
        assert refused.value.code == 401, path
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(url + "?token=" + "x" * len(login.split("token=")[1]), timeout=5)
    browser.get(login)
    assert browser.current_url == url  # the token left the address bar for a cookie
    assert wait_until(lambda: row_of(browser, "sn-1"), 10, every=0.2), browser.find_element("tag name", "body").text
    assert json.loads(browser.execute_script("return document.getElementById('initial').textContent"))["version"] > 0
