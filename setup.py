"""Build hook: the wheel carries the shipped artifacts (data/) inside the package, as sparsefinder/_data.

An editable install reads data/ in the checkout; a wheel installed anywhere reads its own copy
(sparsefinder.model.catalogue.data_dir), so `pip install .` works outside the checkout.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildWithData(build_py):
    def run(self) -> None:
        super().run()
        src = Path(__file__).resolve().parent / "data"
        if src.is_dir() and not self.editable_mode:
            shutil.copytree(src, Path(self.build_lib) / "sparsefinder" / "_data", dirs_exist_ok=True)


setup(cmdclass={"build_py": BuildWithData})
