"""Only here to ship ``higgs_patch.pth`` at the top of site-packages (all metadata is in pyproject.toml).

The .pth file is the process start-up hook (see higgs_patch/startup.py): one line that does nothing
unless HIGGS_PATCH_ACTIVATE is set. setuptools has no declarative way to put a file there. A wheel
gets it from build_lib; an editable install (``pip install -e .``, PEP 660) builds its wheel from the
``install_lib`` folder that setuptools' editable_wheel points at the unpacked wheel, and its
``__editable__.*.pth`` finder sorts, and so runs, before the hook.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "higgs_patch.pth"


class build_py_with_pth(build_py):
    def run(self):
        super().run()
        self.copy_file(str(Path(__file__).parent / "higgs_patch" / PTH), str(self._pth_target()))

    def get_outputs(self, include_bytecode=True):
        return super().get_outputs(include_bytecode) + [str(self._pth_target())]

    def _pth_target(self) -> Path:
        folder = self.get_finalized_command("install").install_lib if self.editable_mode else self.build_lib
        return Path(folder) / PTH


setup(cmdclass={"build_py": build_py_with_pth})
