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
        (f"share/{PACKAGE}/config/rigs", glob("config/rigs/*.yaml")),
    ],
    package_data={PACKAGE: ["py.typed", "model/data/*.tsv"]},
    # Runtime of the ROS-free core and the CPU pipeline. ROS 2 itself (rclpy, messages) comes
    # from the ROS install, or from PyPI wheels via scripts/setup.sh (requirements/ros.txt).
    install_requires=[
        "numpy>=1.24,<3",
        "pyyaml>=6.0",
        "opencv-python-headless>=4.8",
        "onnx>=1.16",
        "onnxruntime>=1.18",
    ],
    extras_require={
        # PyTorch model toolkit (export, reference forward). Pinned: this exact CPU wheel is on
        # the development machines' disk; an unpinned torch pulls a multi-GB CUDA build.
        # scipy: linear_sum_assignment of the training's proposal assignment (train.targets).
        "model": ["torch==2.13.0", "scipy==1.17.1"],
        "dev": ["pytest==9.2.0", "mypy==2.4.1", "ruff==0.17.6"],
        # rosbag2-compatible MCAP bags (bevfusion_ros.ros.bag, bevfusion-make-bag);
        # mcap-ros2-support's reader checks the tests' bags independently, and bag.py imports
        # zstandard itself (mcap also needs it, and lz4, for chunk compression).
        "bag": ["mcap==1.6.0", "mcap-ros2-support==0.6.0", "zstandard==0.25.0"],
        # What any `import nuscenes...` imports (bevfusion-eval's metric code, bevfusion-make-bag
        # on a nuScenes data root). nuscenes-devkit itself is installed after these, with
        # --no-deps: requirements/nuscenes.txt says why.
        "nuscenes": ["matplotlib==3.11.2", "scikit-learn==1.9.1", "pyquaternion==0.9.9",
                     "tqdm==4.70.1", "Pillow==13.0.0", "cachetools==8.0.1"],
        # bevfusion-batch: many bags at once on Ray (an embedded local instance, or a cluster).
        # Every host of a cluster needs the same Ray version (and this package with its extras).
        "batch": ["ray==2.60.0"],
    },
    entry_points={
        "console_scripts": [
            f"bevfusion-inspect = {PACKAGE}.tools.inspect_data:main",
            f"bevfusion-export = {PACKAGE}.tools.export:main",
            f"bevfusion-infer = {PACKAGE}.tools.infer:main",
            f"bevfusion-bench = {PACKAGE}.tools.bench:main",
            f"bevfusion-make-bag = {PACKAGE}.tools.make_bag:main",
            f"bevfusion-make-scene = {PACKAGE}.tools.make_scene:main",
            f"bevfusion-eval = {PACKAGE}.tools.eval:main",
            f"bevfusion-batch = {PACKAGE}.tools.batch:main",
            f"bevfusion-train = {PACKAGE}.tools.train:main",
            f"bevfusion-play = {PACKAGE}.tools.play:main",
            f"bevfusion-record = {PACKAGE}.tools.record:main",
            f"bevfusion_node = {PACKAGE}.tools.node:main",
            f"bevfusion_lifecycle_node = {PACKAGE}.tools.node:managed_main",
        ],
    },
    zip_safe=True,
)
