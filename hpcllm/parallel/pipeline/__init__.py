"""Pipeline parallelism over mpi4py, combined with Horovod data parallelism.

- :mod:`.schedules`   GPipe and 1F1B as pure per-rank instruction lists, and a simulator
- :mod:`.partition`   which blocks each stage holds (by parameters, measured cost, or a list)
- :mod:`.stage`       this rank's slice of the GPT, nothing more
- :mod:`.transport`   raw-buffer p2p channels (16-bit floats as int16, CUDA-aware or staged)
- :mod:`.engine`      runs one stage's instruction list for a step
- :mod:`.trainer`     the P x D training loop (``hpcllm train --pipeline-stages P``)
- :mod:`.consolidate` pipeline checkpoint -> one file (``hpcllm export``)
"""
