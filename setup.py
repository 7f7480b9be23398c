"""hpcllm: train large language models on HPC clusters (Slurm, MPI, Horovod)."""
from setuptools import find_packages, setup

setup(
    name="hpcllm",
    version="0.1.0",
    description="Train GPT models on HPC clusters: HDF5 data prep, Horovod DP, mpi4py pipeline parallelism, Slurm jobs",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["hpcllm", "hpcllm.*"]) + ["hpcllm.slurm_assets"],
    # The sbatch templates, cluster profiles and examples live at the top of the repository
    # (slurm/) where users read them; they ship inside the package as hpcllm.slurm_assets.
    package_dir={"hpcllm.slurm_assets": "slurm"},
    package_data={"hpcllm.slurm_assets": ["templates/*", "profiles/*.toml", "examples/*"],
                  "hpcllm.eval_tasks": ["*.yaml", "*.jsonl"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.1",
        "numpy>=1.24",
        "h5py>=3.9",
        "mpi4py>=3.1",
        "click>=8.1",
        "jinja2>=3.1",
        "tokenizers>=0.15",
        "tqdm>=4.66",
        "matplotlib>=3.7",
        "pyarrow>=14",
        "zstandard>=0.22",
        "psutil>=5.9",
        "tomli>=2.0; python_version<'3.11'",
    ],
    extras_require={"horovod": ["horovod==0.28.1"], "tensorboard": ["tensorboard>=2.14"],
                    "hf": ["transformers>=4.45"],
                    "eval": ["lm-eval>=0.4.5", "transformers>=4.45", "accelerate>=0.30"],
                    "test": ["pytest>=7.4", "pytest-timeout>=2.2"]},
    entry_points={"console_scripts": ["hpcllm=hpcllm.cli:main"]},
    classifiers=["Programming Language :: Python :: 3", "Operating System :: POSIX :: Linux"],
)
