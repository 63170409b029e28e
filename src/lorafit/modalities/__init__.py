"""Modalities compatibility: its components with Modalities' meaning, its data tools and file formats.

Everything here exists so that configs, `.pbin` data and checkpoints made for Modalities (the `lora` branch of
github.com/Modalities/modalities, and modalities 0.5.0) work in lorafit unchanged; docs/modalities.md lists
every component and key and what lorafit does with it.
"""
