"""FSDP with every backend: torch's FullyShardedDataParallel over 2 CPU processes (gloo), wrapped
as the run layer wraps FCMAE (fcmae.training.trainer.fsdp_strategy's wrap policy and arguments:
one unit per ConvNeXt V2 Block, original parameters kept), gives
each rank the unwrapped model's loss on its half of the batch and, after backward, the unwrapped
model's gradients of the mean of both halves' losses. A backend that used a block's submodules
directly, bypassing the block's forward, would run on the unit's unsharded (empty) parameters and
fail here. (Lightning's FSDP strategy is GPU-only; torch's FSDP runs on CPU with device_id=cpu.)"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from helpers import free_port, minkowski

SCRIPT = textwrap.dedent("""
    import copy, json, os, sys
    import torch, torch.distributed as dist, torch.multiprocessing as mp

    def run(rank, port, backends, out):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=2)
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from fcmae.encoders.convnextv2 import Block
        from fcmae.training.trainer import fsdp_strategy
        from fcmae.masking import random_mask
        from fcmae.model import FCMAE
        from helpers import TINY, randomize_

        imgs = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
        mask = random_mask(4, 2, 2, 0.5, generator=torch.Generator().manual_seed(2))
        halves = [(imgs[:2], mask[:2]), (imgs[2:], mask[2:])]
        result = {}
        for backend in backends:
            torch.manual_seed(0)
            ref = randomize_(FCMAE(TINY, backend, img_size=64, decoder_dim=16))
            strategy = fsdp_strategy("32")  # the run layer's units and arguments; float32 (no policy)
            assert strategy.mixed_precision is None
            sharded = FSDP(copy.deepcopy(ref), device_id=torch.device("cpu"), **strategy.kwargs)
            ref_losses = [ref(x, m, 2)[0] for x, m in halves]
            (sum(ref_losses) / 2).backward()
            loss = sharded(*halves[rank], 2)[0]
            loss.backward()
            with FSDP.summon_full_params(sharded, with_grads=True):
                grads = {n.replace("_fsdp_wrapped_module.", ""): p.grad.clone() for n, p in sharded.named_parameters()}
            worst = max(((grads[n] - p.grad).abs().max() / p.grad.abs().max()).item()
                        for n, p in ref.named_parameters())
            units = sum(isinstance(m, FSDP) for m in sharded.modules()) - 1  # the root is one too
            result[backend] = {"loss": loss.item(), "ref_loss": ref_losses[rank].item(), "grad_rel_diff": worst,
                               "params": len(grads), "ref_params": len(list(ref.parameters())), "units": units,
                               "blocks": sum(isinstance(m, Block) for m in ref.modules())}
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
        dist.barrier()  # both ranks done with gloo before either tears it down
        dist.destroy_process_group()

    if __name__ == "__main__":
        port, out, backends = int(sys.argv[1]), sys.argv[2], sys.argv[3].split(",")
        mp.spawn(run, args=(port, backends, out), nprocs=2)
""")


@pytest.mark.slow
def test_fsdp_every_backend_matches_the_unwrapped_model(tmp_path):
    minkowski()
    backends = ["dense", "sparse", "minkowski"]
    script = tmp_path / "fsdp_run.py"
    script.write_text(SCRIPT)
    tests = os.path.dirname(os.path.dirname(__file__))
    path = os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    result = subprocess.run([sys.executable, str(script), str(free_port()), str(tmp_path), ",".join(backends)],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for backend in backends:
            r = got[backend]
            assert r["params"] == r["ref_params"] and r["units"] == r["blocks"] == 10  # 9 encoder blocks, 1 decoder
            assert abs(r["loss"] - r["ref_loss"]) <= 1e-5 * abs(r["ref_loss"]), (rank, backend, r)
            assert r["grad_rel_diff"] <= 1e-5, (rank, backend, r)
