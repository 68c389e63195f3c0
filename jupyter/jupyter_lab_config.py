# JupyterLab settings for the course, read by `make lab` and tests/test_browser.py through
# JUPYTER_CONFIG_PATH=jupyter (the user's own ~/.jupyter is left as it is and still wins where it sets something).
# lab-settings/overrides.json changes JupyterLab's defaults: no "Jupyter news" prompt over lesson 00, no update check
# (both would ask the internet). A learner's own settings (Settings → Settings Editor) still override these.
from pathlib import Path

c = get_config()  # noqa: F821 (defined by traitlets when it loads this file)
c.LabApp.app_settings_dir = str(Path(__file__).resolve().parent / "lab-settings")
