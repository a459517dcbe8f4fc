"""The TailLoR demo: continual fine-tuning of all-MiniLM-L6-v2 on three tasks built from installed packages.

Run it with ``taillor demo [--quick] [--seeds N] [--out DIR]`` (or ``python -m taillor.demo.run``).
"""
