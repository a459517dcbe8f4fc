"""Run by tests/test_distributed.py as ``accelerate launch --multi_gpu --num_processes 2 ... THIS OUT_DIR`` on the
CPU (``Accelerator(cpu=True)``: gloo): the flow of :mod:`distributed_flow` the way an accelerate user writes it
(prepare, a split global batch, accelerator.backward, save on the main process), for both frames. The main process
writes OUT_DIR/<frame>.safetensors (outputs and factors) and OUT_DIR/<frame>-adapter (save_adapter)."""
from __future__ import annotations

import datetime
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import taillor  # noqa: E402
from distributed_flow import BATCH, FRAMES, STEPS, TASKS, data, factors, make_model  # noqa: E402


def main(out_dir: str) -> None:
    # split_batches: each of the 2 processes gets half of every batch of BATCH rows, so the global batch is the
    # single process's.
    # A collective that waits 2 minutes raises (accelerate's default is 30), so a lost peer cannot hang the test.
    accelerator = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(split_batches=True),
                              kwargs_handlers=[InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=120))])
    assert accelerator.num_processes == 2, accelerator.num_processes
    x, targets = data()
    for frame in FRAMES:
        model = make_model(frame)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        forward, optimizer = accelerator.prepare(model, optimizer)
        model = accelerator.unwrap_model(forward)
        results = {}
        for task in range(TASKS):
            loader = accelerator.prepare(DataLoader(TensorDataset(x, targets[task]), batch_size=BATCH))
            for _ in range(STEPS):
                for xb, yb in loader:
                    loss = (forward(xb) - yb).pow(2).mean() + taillor.spectral_penalty(model)
                    optimizer.zero_grad()
                    accelerator.backward(loss)
                    optimizer.step()
            with torch.no_grad():
                results[f"output.task{task}"] = forward(x).detach().clone()
            if task < TASKS - 1:
                taillor.consolidate(model)
        results.update({f"factor.{name}": t for name, t in factors(model).items()})
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            save_file({k: v.contiguous() for k, v in results.items()}, os.path.join(out_dir, f"{frame}.safetensors"))
            taillor.save_adapter(model, os.path.join(out_dir, f"{frame}-adapter"))
        accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1])
