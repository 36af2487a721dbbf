"""A finished run frees its model before the process group, while the interpreter is whole.

Left to interpreter exit, the model (held in reference cycles by its hooks and compiled graphs)
and the gloo process group it points to are torn down in no set order, and a gloo thread can
abort the process after a successful run.
"""

import gc

import torch.distributed as torch_dist

from pipeline import train
from pipeline.model import LeNet

from helpers import TINY_ARGS

OPS = ["train.fused_conv=false"]  # torch's conv ops: the unit tier compiles no C++


def _models_alive() -> int:
    return sum(1 for o in gc.get_objects() if type(o) is LeNet)


def test_main_frees_the_model_and_destroys_the_process_group(tiny_mnist, tmp_path):
    gc.collect()
    before = _models_alive()
    run_dir = tmp_path / "run"
    code = train.main([*TINY_ARGS, f"data.root={tiny_mnist}", f"train.run_dir={run_dir}", *OPS])
    assert code == 0
    assert not torch_dist.is_initialized()
    assert _models_alive() == before  # no collection here: main already freed it
