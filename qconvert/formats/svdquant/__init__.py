"""Nunchaku's and diffusers' SVDQuant files: the plan (``plan.py``), bit layouts (``layout.py``), the
strict reader (``file.py``) and a LoRA's place in the low-rank branch (``lora_branch.py``)."""
