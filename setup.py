"""lmm_align: aligning LLaVA-style vision-language models against hallucination, in JAX."""
import pathlib

import setuptools

_HERE = pathlib.Path(__file__).parent


def _requirements(name: str) -> list[str]:
  lines = (_HERE / name).read_text().splitlines()
  return [
      line.split("#")[0].strip()
      for line in lines
      if line.split("#")[0].strip() and not line.startswith("-r")
  ]


setuptools.setup(
    name="lmm_align",
    version="0.1.0",
    description="Hallucination alignment for LLaVA-style models (SFT, RM, PPO, DPO, AI feedback) in JAX/Flax.",
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["lmm_align", "lmm_align.*"]),
    install_requires=_requirements("requirements.txt"),
    extras_require={
        "test": _requirements("requirements-test.txt"),
        "tpu": _requirements("requirements-tpu.txt"),
    },
    entry_points={"console_scripts": ["lmm-align=lmm_align.main:run"]},
)
