"""bevfusion_ros: ament_python package (colcon) and a plain pip-installable Python package."""
from glob import glob

from setuptools import find_packages, setup

PACKAGE = "bevfusion_ros"

setup(
    name=PACKAGE,
    version="0.1.0",
    description="BEVFusion (6 cameras + lidar -> 3D boxes) for ROS 2, on NVIDIA GPUs and CPUs",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=[PACKAGE, f"{PACKAGE}.*"]),
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        (f"share/{PACKAGE}/launch", glob("launch/*.launch.py")),
        (f"share/{PACKAGE}/config", glob("config/*.yaml") + glob("config/*.xml")),
    ],
    package_data={PACKAGE: ["py.typed"]},
    install_requires=[
        "numpy>=1.24",
        "pyyaml>=6.0",
        "opencv-python-headless>=4.8",
    ],
    extras_require={
        "dev": ["pytest==9.2.0", "mypy==2.4.1", "tensorrt-stubs==10.13.0.35.1"],
    },
    entry_points={
        "console_scripts": [
            f"bevfusion-inspect = {PACKAGE}.tools.inspect_data:main",
        ],
    },
    zip_safe=True,
)
