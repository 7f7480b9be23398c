"""Planning a training run before spending the compute (`hpcllm plan`).

* :mod:`~hpcllm.plan.scaling`  Chinchilla compute-optimal model/data size and the fitted loss
* :mod:`~hpcllm.plan.devices`  device profiles (built-in GPUs, this CPU, user TOML)
* :mod:`~hpcllm.plan.memory`   bytes per process: parameters, optimizer, activations, buffers
* :mod:`~hpcllm.plan.layout`   (pipeline, data-parallel, micro-batch, accumulation) search, step time
* :mod:`~hpcllm.plan.planner`  all of it for one request, as a JSON-able dict; Slurm hand-off
* :mod:`~hpcllm.plan.report`   terminal tables
* :mod:`~hpcllm.plan.measure`  real steps in a fresh process: peak memory and tokens/s here
"""
