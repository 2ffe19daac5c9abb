"""Packaging for cnnvis_tb: the library, its TensorBoard plugin and the tab's static frontend."""

from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent

setup(
    name="cnnvis_tb",
    version="0.1.0",
    description="See inside a CNN while it trains: kernels, feature maps, Grad-CAM, activation "
    "maximization and histograms logged to TensorBoard, with a 'CNN Vis' tab to compare steps and runs.",
    long_description=(HERE / "README.md").read_text(encoding="utf-8") if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[
        "cnnvis_tb",
        "cnnvis_tb.kinds",
        "cnnvis_tb.plugin",
        "cnnvis_tb.integrations",
        "cnnvis_tb.frontend",
    ],
    # The tab's sources live at the top of the repository (tb_plugin_frontend/) and ship inside the
    # wheel as the package ``cnnvis_tb.frontend``, read by the plugin with importlib.resources.
    package_dir={"cnnvis_tb.frontend": "tb_plugin_frontend"},
    package_data={"cnnvis_tb.frontend": ["*.js", "*.css", "*.html"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",
        "tensorboard>=2.14",
        "numpy>=1.23",
        "pillow>=9.0",
        "google-crc32c>=1.5",  # C checksums for TensorBoard event records (see cnnvis_tb/events.py)
        "isal>=1.6",  # ISA-L's deflate for the PNGs: about 4x faster than zlib's (see cnnvis_tb/events.py)
        "tqdm>=4.60",  # progress bars of the examples (cnnvis_tb.progress)
    ],
    extras_require={
        "test": [
            "pytest>=7",
            "playwright>=1.40",
            "hypothesis>=6",
            "ruff",
            "lightning>=2.0",
            "grad-cam>=1.5",  # the CAM anchors the CAM family is checked against
            "torchcam>=0.4",
            "boto3",  # s3:// log dirs through TensorBoard's file layer
            "moto[server]>=5",  # an S3-compatible server on 127.0.0.1 for the remote log dir tests
            "timm>=0.9",
            "accelerate>=0.20",
            "quantus>=0.5",  # its PointingGame anchors our pointing game
        ],
        "timm": ["timm>=0.9"],
        "s3": ["boto3"],
        "gcs": ["gcsfs"],
        "lightning": ["lightning>=2.0"],
        "bench": ["grad-cam>=1.5", "torchcam>=0.4"],
    },
    entry_points={
        "tensorboard_plugins": ["cnnvis = cnnvis_tb.plugin.loader:CnnVisLoader"],
        "console_scripts": ["cnnvis-tb = cnnvis_tb.__main__:main"],
    },
    license="Apache-2.0",
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
