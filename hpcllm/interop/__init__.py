"""Models in and out of hpcllm: Hugging Face transformers checkpoints (hf.py), safetensors."""
