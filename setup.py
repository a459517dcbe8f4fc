"""Build script: the optional CUDA extension taillor._C (randomized SVD). See README "Building the extension"."""
from setuptools import setup

setup(ext_modules=[])
