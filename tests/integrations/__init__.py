"""Integration tests with the real libraries (CPU, tiny models built from configs, nothing downloaded)."""

import os

# before any test module imports huggingface_hub (accelerate and transformers do)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
