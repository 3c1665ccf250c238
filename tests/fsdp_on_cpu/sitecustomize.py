"""Test-only (tests/test_distributed.py puts this directory on PYTHONPATH, with BEZOAR_TEST_FSDP_ON_CPU=1):
lift the two CUDA-only gates on FSDP so that the real FSDP2 code of torch, accelerate, the HF Trainer and
the stage runs on a CPU (gloo) group:

- accelerate 1.15 switches to DistributedType.FSDP for GPU (and other accelerator) groups only
  (AcceleratorState.__init__, accelerate/state.py); here a CPU group given an FSDP plugin is switched as a
  GPU group would be, every time the shared state is (re)initialised;
- the stage refuses ``fsdp`` on CPU for that reason (bezoar_jobs.training.config._fsdp); here its other
  checks and defaults run as on CUDA.

Nothing else is changed: what runs is torch's fully_shard on a CPU mesh, accelerate's FSDP2 preparation and
state-dict gathering, the Trainer's FSDP checkpointing and resume. (In that test's processes this module
shadows any other sitecustomize, such as a distribution's.)
"""

import os

if os.environ.get("BEZOAR_TEST_FSDP_ON_CPU") == "1":
    import dataclasses

    import accelerate.state as _state

    _accelerator_init = _state.AcceleratorState.__init__

    def _init(self, *args, fsdp_plugin=None, **kwargs):
        _accelerator_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        plugin = fsdp_plugin if fsdp_plugin is not None else self.__dict__.get("_test_fsdp_plugin")
        if plugin is not None and self.distributed_type == _state.DistributedType.MULTI_CPU:
            self.distributed_type = _state.DistributedType.FSDP
            self.fsdp_plugin = plugin
            self.__dict__["_test_fsdp_plugin"] = plugin

    _state.AcceleratorState.__init__ = _init

    from bezoar_jobs.training import config as _config

    _check = _config._fsdp

    def _fsdp(kwargs, path, plan, world_size, log):
        _check(kwargs, path, dataclasses.replace(plan, cuda=True), world_size, log)

    _config._fsdp = _fsdp
