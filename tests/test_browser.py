"""The course as learners meet it: JupyterLab in a real browser (headless Chromium driven by selenium).

JupyterLab starts the way `make lab` starts it (the course's settings in jupyter/, through JUPYTER_CONFIG_PATH; the
project's environment as the kernel) on a free local port with a token. Its root is a temporary folder holding copies
of the notebooks, so running them never touches the committed files, and its config, data, runtime, settings and
workspace folders are temporary too, so the user's home configuration plays no part. For each notebook the test opens
it, runs Run → Run All Cells from the menu bar, waits for every cell to finish and the kernel to go idle, and asserts:
no error and no stderr output, every code cell executed, a rendered figure; on lesson 00 also a rendered
progress-bar widget (tqdm.auto, as the package's Trainer uses it), and on lesson 01 a slider that, moved with the
arrow keys, redraws the figure. Screenshots are saved under the test's tmp_path and their paths printed (`pytest -s`
shows them).

Needs Debian's `chromium` and `chromium-driver` (/usr/bin/chromium, /usr/bin/chromedriver; no browser is ever
downloaded): `make test` (and so .ci/run) installs them with apt when run as root, and there a missing browser fails
the tests (MINIDIT_BROWSER_TESTS=required); elsewhere the browser tests skip.
"""

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import nbformat
import pytest
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

ROOT = Path(__file__).resolve().parents[1]
LAB_CONFIG = ROOT / "jupyter"  # the course's JupyterLab settings, shared with `make lab`
WELCOME = "notebooks/00_welcome.ipynb"
ASSIGNMENT = "solutions/A1_tokens.ipynb"
# Lessons with an ipywidgets slider that redraws a figure: lesson 01's patch size / resolution → tokens → attention
# cost. Lesson 00's tqdm.auto progress bar (the bar the package's Trainer shows) is checked in its own test.
INTERACTIVE = ["notebooks/01_patch_tokens.ipynb"]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
RUN_TIMEOUT = 420  # seconds for one notebook's Run All (lessons take ≤ 3 min on 2 quiet cores)
# `make test` as root with apt sets MINIDIT_BROWSER_TESTS=required: a missing browser fails the tests, not skips them.
REQUIRED = os.environ.get("MINIDIT_BROWSER_TESTS") == "required"
NO_BROWSER = ("the browser tests need Debian's chromium and chromium-driver (/usr/bin/chromium, "
              "/usr/bin/chromedriver): `apt-get install chromium chromium-driver` as root "
              "(`make test` and .ci/run do it when run as root)")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


# ---- JupyterLab ----------------------------------------------------------------------------------------------------
class Lab:
    """A JupyterLab server in its own process group, with a token, on a free port of 127.0.0.1.

    Its config, data, runtime, settings and workspace folders are temporary (the user's home plays no part); the
    course's settings come from jupyter/ through JUPYTER_CONFIG_PATH, as in `make lab`. By default its root is a
    temporary folder holding copies of `notebooks`; `make=True` starts it with `make lab` itself (root: the repo).
    """

    def __init__(self, base: Path, notebooks: list[str] = (), make: bool = False):
        self.base, self.root = base, ROOT if make else base / "root"
        for rel in notebooks:  # copies: the browser runs and saves these, never the committed notebooks
            (self.root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / rel, self.root / rel)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.token = base64.b32encode(os.urandom(15)).decode().lower()
        self.url = f"http://127.0.0.1:{self.port}"
        self.runtime = base / "runtime"
        self.env = {**os.environ, "JUPYTER_CONFIG_DIR": str(base / "config"), "JUPYTER_DATA_DIR": str(base / "data"),
                    "JUPYTER_RUNTIME_DIR": str(self.runtime), "IPYTHONDIR": str(base / "ipython")}
        for var in ("JUPYTER_PATH", "JUPYTER_CONFIG_PATH", "JUPYTER_PREFER_ENV_PATH", "JUPYTER_PLATFORM_DIRS"):
            self.env.pop(var, None)
        args = ["--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={self.port}",
                "--ServerApp.port_retries=0", f"--IdentityProvider.token={self.token}"]
        if make:
            self.cmd = ["make", "--no-print-directory", "-s", "lab", "LAB_ARGS=" + " ".join(args)]
        else:
            self.env["JUPYTER_CONFIG_PATH"] = str(LAB_CONFIG)
            self.cmd = [sys.executable, "-m", "jupyterlab", *args, f"--ServerApp.root_dir={self.root}"]
            self.cmd += ["--allow-root"] if os.geteuid() == 0 else []  # CI runs as root
            if notebooks:  # as `make lab` does: committed widget outputs render before a run
                subprocess.run([sys.executable, "-m", "jupyter", "trust", *notebooks], cwd=self.root, env=self.env,
                               check=True, capture_output=True)
        self.log = base / "jupyterlab.log"
        self.proc = None

    def start(self, timeout: float = 180):
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(self.cmd, cwd=self.root, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"JupyterLab exited with status {self.proc.returncode}:\n{self.log_tail()}")
            try:
                self.api("GET", "/api/status")
                return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        raise RuntimeError(f"JupyterLab did not answer within {timeout:.0f} s:\n{self.log_tail()}")

    def api(self, method: str, path: str, timeout: float = 10):
        req = urllib.request.Request(self.url + path, method=method,
                                     headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            body = r.read()
        return json.loads(body) if body else None

    def log_tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    def kernel_state(self, path: str) -> str | None:
        for s in self.api("GET", "/api/sessions"):
            if s["path"] == path:
                return s["kernel"]["execution_state"]
        return None

    def close_sessions(self):
        for s in self.api("GET", "/api/sessions"):
            self.api("DELETE", f"/api/sessions/{s['id']}")

    def kernel_pids(self) -> list[int]:
        """Kernels this server started: their command line names a connection file in our runtime folder."""
        pids = []
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if str(self.runtime) in cmdline and int(proc.name) != os.getpid():
                pids.append(int(proc.name))
        return pids

    def stop(self):
        """Shut down on every path: the server's own shutdown (kernels included), then its process group, then any
        kernel it left behind (kernels run in sessions of their own)."""
        if self.proc is None:
            return
        kernels = self.kernel_pids()
        if self.proc.poll() is None:
            try:
                self.api("POST", "/api/shutdown", timeout=5)
                self.proc.wait(timeout=20)
            except (OSError, urllib.error.URLError, subprocess.TimeoutExpired):
                pass
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            if self.proc.poll() is not None:
                break
            try:
                os.killpg(self.proc.pid, sig)
                self.proc.wait(timeout=wait)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        for pid in kernels + self.kernel_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    server = Lab(tmp_path_factory.mktemp("lab"), [WELCOME, ASSIGNMENT, *INTERACTIVE])
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (CHROMIUM and CHROMEDRIVER):
        (pytest.fail if REQUIRED else pytest.skip)(NO_BROWSER)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1400,1000",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    options.set_capability("unhandledPromptBehavior", "accept")  # a "leave page?" prompt never blocks
    service = webdriver.ChromeService(executable_path=CHROMEDRIVER)  # given: selenium never looks for a driver
    try:
        driver = webdriver.Chrome(options=options, service=service)
    except WebDriverException as e:
        pytest.fail(f"headless Chromium did not start ({CHROMIUM}, {CHROMEDRIVER}): {e.msg}")
    try:
        yield driver
    finally:
        driver.quit()


# ---- driving JupyterLab through its UI ------------------------------------------------------------------------------
def wait_for(condition, timeout: float, what: str, poll: float = 0.5, detail=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}" + (f": {detail()}" if detail else ""))


def shot(driver, out: Path, name: str, element=None) -> Path:
    path = out / f"{name}.png"
    (element.screenshot if element is not None else driver.save_screenshot)(str(path))
    print(f"screenshot: {path}")
    return path


def code_cells(path: str) -> list:
    return [c for c in nbformat.read(ROOT / path, as_version=4).cells if c.cell_type == "code"]


def open_notebook(driver, lab: Lab, path: str):
    """Open `path` in a fresh workspace; wait until all its code cells are in the page (JupyterLab attaches them a
    few at a time) and its kernel is idle."""
    driver.get(f"{lab.url}/lab/tree/{path}?reset&token={lab.token}")
    expected = len(code_cells(path))
    wait_for(lambda: driver.execute_script(
        "const p = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden)');"
        "return p !== null && p.querySelectorAll('.jp-CodeCell').length;") == expected, 120,
        f"{path} to open with its {expected} code cells")
    wait_for(lambda: lab.kernel_state(path) == "idle", 120, f"the kernel of {path} to start")


def widget_stand_ins(driver, path: str) -> list[str]:
    """Committed widget outputs shown as their plain-text stand-in ("IntSlider(value=3, …)", a frozen "0%" bar),
    which is what JupyterLab shows in a notebook it does not trust."""
    texts = {o.data["text/plain"].strip()[:40] for c in code_cells(path) for o in c.outputs
             if "application/vnd.jupyter.widget-view+json" in o.get("data", {}) and "text/plain" in o.data}
    shown = driver.execute_script(
        "return [...document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) "
        ".jp-OutputArea-output[data-mime-type=\"text/plain\"]')].map(e => e.textContent.trim());")
    return [t for t in shown if t[:40] in texts]


def notifications(driver) -> list[str]:
    return driver.execute_script(
        "return [...document.querySelectorAll('.Toastify__toast, .jp-Notification-Toast')].map(e => e.innerText);")


def click_menu(driver, menu: str, item: str):
    driver.find_element(By.XPATH, f"//li[contains(@class,'lm-MenuBar-item')][.//*[text()='{menu}']]").click()
    entry = wait_for(lambda: driver.find_elements(
        By.XPATH, f"//li[contains(@class,'lm-Menu-item')][.//*[contains(@class,'lm-Menu-itemLabel') and "
                  f"text()='{item}']]"), 10, f"the menu item {menu} → {item}")
    entry[0].click()


CELL_STATE = """
const cells = [...document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-CodeCell')];
return cells.map((cell, i) => ({
    prompt: (cell.querySelector('.jp-InputArea-prompt') || {}).textContent || '',
    stderr: [...cell.querySelectorAll('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')]
        .map(e => e.textContent.slice(0, 2000)),
}));
"""


def run_all(driver, lab: Lab, path: str) -> list[dict]:
    """Edit → Clear Outputs of All Cells, Run → Run All Cells, then wait until every code cell has run (a number in
    its prompt) and the kernel is idle, twice in a row."""
    click_menu(driver, "Edit", "Clear Outputs of All Cells")
    wait_for(lambda: not any(c["prompt"].strip("[]: ") for c in driver.execute_script(CELL_STATE)), 30,
             f"the outputs of {path} to clear")
    click_menu(driver, "Run", "Run All Cells")

    expected = len(code_cells(path))

    def done():
        cells = driver.execute_script(CELL_STATE)
        finished = len(cells) == expected and all(c["prompt"].strip("[]: ").isdigit() for c in cells)
        errors = any(c["stderr"] for c in cells) and not any("*" in c["prompt"] for c in cells)  # stopped early
        return cells if (finished or errors) and lab.kernel_state(path) == "idle" else None

    def state():
        return f"kernel {lab.kernel_state(path)}, prompts {[c['prompt'] for c in driver.execute_script(CELL_STATE)]}"

    wait_for(done, RUN_TIMEOUT, f"{path} to finish running", detail=state)
    time.sleep(1)
    return wait_for(done, 30, f"{path} to stay idle", detail=state)


def check_run(cells: list[dict], path: str):
    problems = [f"code cell {i + 1}: {'; '.join(c['stderr'])}" for i, c in enumerate(cells) if c["stderr"]]
    assert not problems, f"{path}: error or stderr output in the browser:\n" + "\n".join(problems)
    unrun = [i + 1 for i, c in enumerate(cells) if not c["prompt"].strip("[]: ").isdigit()]
    assert not unrun, f"{path}: code cells {unrun} did not run (prompts {[cells[i - 1]['prompt'] for i in unrun]})"


def rendered_images(driver, within=None) -> list[str]:
    """The src of every image output that the browser decoded (a PNG figure, not a broken image), in the open notebook
    or `within` one element."""
    return driver.execute_script(
        "const scope = arguments[0] || document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden)');"
        "return [...scope.querySelectorAll('.jp-RenderedImage img')]"
        ".filter(img => img.complete && img.naturalWidth > 0).map(img => img.src);", within)


def save_and_close(driver, lab: Lab):
    """File → Save Notebook (the temporary copy; a learner's next step, and no "leave page?" prompt), then end the
    notebook's kernel."""
    click_menu(driver, "File", "Save Notebook")
    wait_for(lambda: not driver.find_elements(By.CSS_SELECTOR, ".jp-mod-current.jp-mod-dirty"), 30, "the save")
    lab.close_sessions()


# ---- the tests ------------------------------------------------------------------------------------------------------
def test_lab_uses_the_projects_kernel(tmp_path):
    """The notebooks' kernel (python3) is this environment's ipykernel, whatever the user's home holds."""
    listed = subprocess.run([sys.executable, "-m", "jupyter", "kernelspec", "list", "--json"],
                            env=Lab(tmp_path).env, capture_output=True, text=True, check=True)
    spec = json.loads(listed.stdout)["kernelspecs"]["python3"]
    assert Path(spec["resource_dir"]).resolve().is_relative_to(Path(sys.prefix).resolve()), spec
    assert spec["spec"]["argv"][0] in ("python", sys.executable), spec  # "python": the server's own interpreter


def test_make_lab_opens_lesson_00_with_the_course_settings(tmp_path):
    """`make lab` serves the repository, opens lesson 00 and applies jupyter/'s settings (no news prompt)."""
    server = Lab(tmp_path, make=True)
    try:
        server.start()
        opened = [p.read_text() for p in server.runtime.glob("jpserver-*-open.html")]
        assert any(f"/lab/tree/{WELCOME}?" in page for page in opened), f"make lab does not open {WELCOME}: {opened}"
        welcome = server.api("GET", f"/api/contents/{WELCOME}")
        untrusted = [i + 1 for i, c in enumerate(c for c in welcome["content"]["cells"] if c["cell_type"] == "code")
                     if not c["metadata"].get("trusted")]
        assert not untrusted, f"make lab does not trust {WELCOME}: code cells {untrusted} (see `jupyter trust`)"
        notification = server.api("GET", "/lab/api/settings/@jupyterlab/apputils-extension:notification")
        defaults = {k: v.get("default") for k, v in notification["schema"]["properties"].items()}
        assert defaults["fetchNews"] == "false" and defaults["checkForUpdates"] is False, defaults
    finally:
        server.stop()


def test_lesson_00_opens_without_distractions_and_runs(lab, browser, tmp_path):
    open_notebook(browser, lab, WELCOME)
    time.sleep(3)  # the news prompt, when enabled, appears a moment after the page is restored
    shot(browser, tmp_path, "00_welcome-opened")
    assert not notifications(browser), f"a notification covers lesson 00: {notifications(browser)}"
    assert not widget_stand_ins(browser, WELCOME), f"widgets shown as text: {widget_stand_ins(browser, WELCOME)}"
    cells = run_all(browser, lab, WELCOME)
    shot(browser, tmp_path, "00_welcome-after-run-all")
    check_run(cells, WELCOME)
    check_progress_bar(browser, tmp_path, WELCOME, ".jp-NotebookPanel:not(.lm-mod-hidden)")
    figures = browser.find_elements(By.CSS_SELECTOR, ".jp-NotebookPanel:not(.lm-mod-hidden) .jp-RenderedImage")
    assert figures and rendered_images(browser), "lesson 00 rendered no figure"
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", figures[0])
    shot(browser, tmp_path, "00_welcome-first-figure")
    assert not notifications(browser), f"a notification covers lesson 00: {notifications(browser)}"
    save_and_close(browser, lab)


def test_assignment_runs(lab, browser, tmp_path):
    open_notebook(browser, lab, ASSIGNMENT)
    cells = run_all(browser, lab, ASSIGNMENT)
    shot(browser, tmp_path, "A1_tokens-after-run-all")
    check_run(cells, ASSIGNMENT)
    assert rendered_images(browser), "the assignment rendered no figure"
    save_and_close(browser, lab)


@pytest.mark.parametrize("path", INTERACTIVE)
def test_interactive_lesson(lab, browser, tmp_path, path):
    open_notebook(browser, lab, path)
    cells = run_all(browser, lab, path)
    check_run(cells, path)
    panel = ".jp-NotebookPanel:not(.lm-mod-hidden)"
    assert rendered_images(browser), f"{path} rendered no figure"
    check_slider(browser, lab, tmp_path, path, panel)
    save_and_close(browser, lab)


def check_progress_bar(browser, tmp_path, path, panel):
    bars = browser.find_elements(By.CSS_SELECTOR, f"{panel} .jp-OutputArea-output .widget-hprogress")
    assert bars, f"{path}: no progress-bar widget rendered (is ipywidgets installed in the kernel?)"
    bar = bars[0].find_element(By.XPATH, "./..")  # tqdm's HBox: description, bar, counts
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", bar)
    shot(browser, tmp_path, "progress-bar", bar)
    assert "100%" in bar.text, f"{path}: the progress bar did not reach 100 %: {bar.text!r}"


def check_slider(browser, lab, tmp_path, path, panel):
    sliders = browser.find_elements(By.CSS_SELECTOR, f"{panel} .jp-OutputArea-output .widget-slider")
    assert sliders, f"{path}: no slider widget rendered"
    slider = sliders[0]
    # The slider's code cell holds the figure its function draws (interact(), or sliders + interactive_output).
    cell = slider.find_element(By.XPATH, "./ancestor::div[contains(concat(' ', @class, ' '), ' jp-CodeCell ')][1]")
    output = cell.find_element(By.CSS_SELECTOR, ".jp-Cell-outputArea")
    browser.execute_script("arguments[0].scrollIntoView({block: 'start'});", output)
    readout = slider.find_element(By.CSS_SELECTOR, ".widget-readout")
    value = readout.text
    before = wait_for(lambda: rendered_images(browser, output), 60, f"{path}: the widget's figure")
    shot(browser, tmp_path, "slider-before", output)

    handle = slider.find_element(By.CSS_SELECTOR, ".noUi-handle")
    handle.click()
    for key in (Keys.ARROW_RIGHT, Keys.ARROW_LEFT):  # left when the slider starts at its maximum
        for _ in range(4):
            handle.send_keys(key)
            time.sleep(0.2)
        if readout.text != value:
            break
    wait_for(lambda: readout.text != value, 30, f"{path}: the slider to move (readout {value})")
    wait_for(lambda: (lambda imgs: imgs and imgs != before)(rendered_images(browser, output)), 180,
             f"{path}: the figure to change after the slider moved")
    wait_for(lambda: lab.kernel_state(path) == "idle", 180, f"{path}: the kernel to go idle after the slider moved")
    time.sleep(1)
    after = rendered_images(browser, output)
    shot(browser, tmp_path, "slider-after", output)
    assert after and after != before, f"{path}: the slider moved from {value} to {readout.text}, the figure did not"
