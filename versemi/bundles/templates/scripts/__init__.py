"""Helper code of this MONAI bundle (standard library, torch and MONAI only; no versemi).

configs/inference.json loads ``scripts/inference.py`` by path (``runpy.run_path``), so the bundle
runs from any working directory and no other module named ``scripts`` can shadow it.
"""
