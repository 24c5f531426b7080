"""Packaging for evotok_hf: EvoTok, a unified image tokenizer, native to the Hugging Face stack."""

from setuptools import find_packages, setup

install_requires = [
    # Lower bounds only: users bring their own (CUDA) torch; constraints.txt pins what CI tests.
    "torch>=2.4",
    "transformers>=5.0",
    "safetensors>=0.4",
    "huggingface_hub>=1.0",
    "numpy>=1.24",
    "pillow>=10.0",
]

extras = {
    # Training: Accelerate loop, Hub datasets, PEFT/TRL fine-tuning.
    "train": ["accelerate>=1.0", "datasets>=3.0", "peft>=0.14", "trl>=0.20", "tqdm>=4.60"],
    # Evaluation: metrics and plots (offline-capable parts only; see README for the online extras).
    "eval": ["torchmetrics>=1.4", "scikit-image>=0.22", "scikit-learn>=1.3", "matplotlib>=3.7", "evaluate>=0.4"],
    # The demo / Space.
    "demo": ["scikit-image>=0.22", "scikit-learn>=1.3", "matplotlib>=3.7", "gradio>=5.0"],
    # Benchmarks: the reference residual VQ we compare against.
    "bench": ["vector-quantize-pytorch>=1.20"],
}
extras["dev"] = sorted(
    {"pytest>=8.0", "scikit-image>=0.22", "scikit-learn>=1.3", "accelerate>=1.0", "matplotlib>=3.7"}
)

setup(
    name="evotok_hf",
    version="0.1.0.dev0",
    description="EvoTok (residual latent evolution image tokenizer) for transformers, diffusers and friends",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    package_dir={"": "src"},
    packages=find_packages("src"),
    python_requires=">=3.10",
    install_requires=install_requires,
    extras_require=extras,
)
