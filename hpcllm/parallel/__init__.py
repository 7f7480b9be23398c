"""Parallelism lives here, outside the model: topology, Horovod data parallelism, pipelines."""
