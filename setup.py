"""Package setup driven by settings.ini, in the nbdev 2 layout."""
from configparser import ConfigParser

import setuptools

config = ConfigParser(delimiters=["="])
config.read("settings.ini", encoding="utf-8")
cfg = config["DEFAULT"]

expected = (
    "version description keywords author author_email license "
    "user lib_name min_python git_url"
).split()
missing = [key for key in expected if key not in cfg]
if missing:
    raise SystemExit(f"settings.ini is missing the keys {missing}; add them under [DEFAULT].")

# SPDX identifiers: setuptools 77 and newer deprecate the "License ::" classifiers.
licenses = {"apache2": "Apache-2.0", "mit": "MIT"}
statuses = ["1 - Planning", "2 - Pre-Alpha", "3 - Alpha", "4 - Beta", "5 - Production/Stable"]
py_versions = "3.9 3.10 3.11 3.12 3.13".split()

license_expression = licenses.get(cfg["license"].lower(), cfg["license"])
min_python = cfg["min_python"]
requirements = cfg.get("requirements", "").split()
dev_requirements = cfg.get("dev_requirements", "").split()
console_scripts = cfg.get("console_scripts", "").split()

with open("README.md", encoding="utf-8") as f:
    long_description = f.read()

setuptools.setup(
    name=cfg["lib_name"],
    license=license_expression,
    classifiers=[
        "Development Status :: " + statuses[int(cfg.get("status", "3")) - 1],
        "Intended Audience :: " + cfg.get("audience", "Developers").title(),
        "Natural Language :: " + cfg.get("language", "English").title(),
    ]
    + ["Programming Language :: Python :: " + v for v in py_versions[py_versions.index(min_python):]],
    url=cfg["git_url"],
    packages=setuptools.find_packages(include=[cfg["lib_path"], cfg["lib_path"] + ".*"]),
    include_package_data=True,
    install_requires=requirements,
    extras_require={"dev": dev_requirements, "bench": ["torch", "threadpoolctl>=3"]},
    dependency_links=cfg.get("dep_links", "").split(),
    python_requires=">=" + min_python,
    long_description=long_description,
    long_description_content_type="text/markdown",
    zip_safe=False,
    entry_points={
        "console_scripts": console_scripts,
        "nbdev": [f"{cfg['lib_path']}={cfg['lib_path']}._modidx:d"],
    },
    version=cfg["version"],
    description=cfg["description"],
    keywords=cfg["keywords"],
    author=cfg["author"],
    author_email=cfg["author_email"],
)
