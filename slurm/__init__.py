"""Sbatch templates, cluster profiles and example scripts (installed as hpcllm.slurm_assets)."""
