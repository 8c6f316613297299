"""Integrations: Hugging Face models (:mod:`.hf`) and TRL trainers (:mod:`.trl`, needs ``trl``).

Import the TRL integration explicitly (``from expo_kernels.integrations.trl import FusedDPOTrainer``)
so that ``import expo_kernels`` never imports TRL.
"""
