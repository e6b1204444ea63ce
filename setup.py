"""Packages einc and ships grammar/ (the one definition of the syntax) as einc.grammar."""
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["einc", "einc.*"]) + ["einc.grammar"],
    package_dir={"einc.grammar": "grammar"},
)
