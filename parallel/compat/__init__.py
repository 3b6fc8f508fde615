"""Every patch ShardForge applies to megatron-core and torch.cuda, and nothing else.

- `apply_fixes()`: device-independent megatron-core fixes, once per process (init_distributed).
- `defer_megatron_compile()`: megatron-core's import-time torch.compile decorators compile at
  first call instead (the command line entry points, before megatron-core is imported).
- `cpu_emulation()`: a context that answers CUDA APIs on the CPU (gloo runs), restored on exit.
- `provide_fused_weight_gradient`, `te_fused_adam`: ShardForge kernels served under the apex /
  TransformerEngine names megatron-core looks up.

Each patch checks `megatron.core.__version__` against `VERIFIED` first and names the upstream
failure it removes; tests/unit/test_compat.py reproduces each failure on the unpatched code.
"""
from parallel.compat.deferred_compile import defer_megatron_compile
from parallel.compat.emulation import cpu_emulation
from parallel.compat.fixes import apply_fixes, set_moe_aux_loss_factor
from parallel.compat.standins import provide_fused_weight_gradient, te_fused_adam
from parallel.compat.version import VERIFIED, UnverifiedMegatronVersion, check_megatron_version

__all__ = ["VERIFIED", "UnverifiedMegatronVersion", "apply_fixes", "check_megatron_version", "cpu_emulation",
           "defer_megatron_compile", "provide_fused_weight_gradient", "set_moe_aux_loss_factor", "te_fused_adam"]
