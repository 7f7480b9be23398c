"""Using a trained model without MPI: sampling (generate.py) and the single-file export
(export.py). Depends on the model and the checkpoint format only."""
