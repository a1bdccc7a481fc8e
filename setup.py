"""LibraGHM: balanced-learning methods (Libra R-CNN, GHM, OHEM, BiFPN) for Detectron2."""
from setuptools import find_packages, setup

setup(
    name="libraghm",
    version="0.1.0",
    description="Libra R-CNN, GHM, OHEM and BiFPN as registry-built Detectron2 parts",
    package_dir={"": "projects/LibraGHM"},
    packages=find_packages("projects/LibraGHM"),
    package_data={"libraghm.model_zoo": ["checkpoints.json"]},
    python_requires=">=3.8",
    # detectron2 itself is deliberately not listed: a user's own detectron2 build must not be
    # replaced. requirements.txt pins the verified stack, detectron2 wheel included.
    install_requires=["torch", "torchvision", "fvcore", "pycocotools", "numpy", "opencv-python-headless"],
)
