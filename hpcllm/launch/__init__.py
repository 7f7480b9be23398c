"""Launching hpcllm on clusters: sbatch scripts from templates and cluster profiles.

Launch details (srun vs mpirun vs horovodrun, signals, requeue) live here and in the
templates under slurm/, nowhere else.
"""
from hpcllm.launch.profiles import Profile, available_profiles, load_profile
from hpcllm.launch.slurm import (PreprocessJob, SbatchOptions, Script, TrainJob, describe_chain,
                                 render_preprocess, render_train, submit_chain, write_scripts)

__all__ = ["Profile", "available_profiles", "load_profile", "PreprocessJob", "SbatchOptions", "Script",
           "TrainJob", "describe_chain", "render_preprocess", "render_train", "submit_chain", "write_scripts"]
