"""Build hooks: the page's browser packages (xterm.js and its fit addon) go inside the package.

The versions pinned in package.json (installed by `npm ci`) are copied from node_modules into
remoterun/page/vendor/ before the wheel or sdist is made, so an installed RemoteRun serves its
whole page with no network and no node_modules at run time. `python setup.py vendor` (what
`make vendor` runs) does only the copy.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from setuptools import Command, setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

ROOT = Path(__file__).resolve().parent
TARGET = ROOT / "remoterun" / "page" / "vendor"
# served prefix under /vendor/ -> (npm package, the files the page loads, plus licences)
PACKAGES = {
    "xterm": ("@xterm/xterm", ("lib/xterm.mjs", "lib/xterm.js", "css/xterm.css", "LICENSE",
                               "package.json")),
    "xterm-addon-fit": ("@xterm/addon-fit", ("lib/addon-fit.mjs", "lib/addon-fit.js",
                                             "LICENSE", "package.json")),
}


def vendor(required: bool = True) -> bool:
    """Copy the pinned packages into remoterun/page/vendor; False (or an error) if absent."""
    pins = json.loads((ROOT / "package.json").read_text())["dependencies"]
    for name, (package, files) in PACKAGES.items():
        source = ROOT / "node_modules" / package
        if not source.is_dir():
            if (TARGET / name / "package.json").is_file():  # an sdist: already inside
                continue
            if required:
                raise SystemExit(f"{source} is missing: run `npm ci` before building")
            print(f"warning: {source} is missing: the page will have no terminal")
            return False
        found = json.loads((source / "package.json").read_text())["version"]
        if found != pins[package]:
            raise SystemExit(f"{package} {found} in node_modules, package.json pins "
                             f"{pins[package]}: run `npm ci`")
        for rel in files:
            (TARGET / name / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / rel, TARGET / name / rel)
    return True


class VendorBuildPy(build_py):
    """build_py that vendors first (leniently for an editable install: node_modules serves)."""

    def run(self) -> None:
        vendor(required=not getattr(self, "editable_mode", False))
        super().run()


class VendorSdist(sdist):
    """sdist that vendors first, so the source archive carries the page whole."""

    def run(self) -> None:
        vendor()
        super().run()


class Vendor(Command):
    """`python setup.py vendor`: only the copy."""

    description = "copy the page's pinned npm packages into remoterun/page/vendor"
    user_options: list[tuple[str, str | None, str]] = []

    def initialize_options(self) -> None:
        """No options."""

    def finalize_options(self) -> None:
        """No options."""

    def run(self) -> None:
        vendor()


setup(cmdclass={"build_py": VendorBuildPy, "sdist": VendorSdist, "vendor": Vendor})
