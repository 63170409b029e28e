"""Only what pyproject.toml cannot say: the shipped configs (the repository's configs/*.yaml) go into the wheel as
lorafit/configs/, so `lorafit configs list|cp` works from a pip install as it does from a checkout
(lorafit/commands/configs.py looks in the package first, then in the checkout). configs/ stays at the repository's
root, where the docs, the tests and the quickstart name it."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

CONFIGS = Path(__file__).resolve().parent / "configs"


class BuildPyWithConfigs(build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode:  # an editable install reads the checkout's configs/ itself
            return
        target = Path(self.build_lib) / "lorafit" / "configs"
        target.mkdir(parents=True, exist_ok=True)
        for path in sorted(CONFIGS.glob("*.yaml")):
            self.copy_file(str(path), str(target / path.name))


setup(cmdclass={"build_py": BuildPyWithConfigs})
