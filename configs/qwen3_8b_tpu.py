"""Qwen3-8B TP-Schedule RL on a TPU v5p-8 (4 chips, 95 GiB HBM each): the 4B recipe one size up.

    python -m tsched.plan --config=configs/qwen3_8b_tpu.py --topology=v5p:2x2x1

compiles the update and the sampler for the slice through libtpu and prints memory per chip (README,
"Will it fit?"). Same settings as configs/qwen3_4b_tpu.py, tensor-parallel over the 4 chips; 8B has untied embeddings.
"""

import importlib.util
import os


def _qwen3_4b():
    # By path: config files are loaded by path (absl's config_flags), not imported as a package.
    spec = importlib.util.spec_from_file_location("qwen3_4b_tpu", os.path.join(os.path.dirname(__file__),
                                                                               "qwen3_4b_tpu.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def get_config():
    c = _qwen3_4b()
    c.run_dir = "runs/qwen3_8b_tp"
    c.model.preset = "qwen3-8b"
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 4
    # The longest power-of-two budget that leaves >= 10% of HBM free (tsched.plan: 25% at 16k; doubling it
    # does not fit). Prompts per step barely move the plan (only the batch arrays grow): 64, as for 4B.
    c.rl.max_new_tokens = 16384
    return c
