"""Multi-process training on ``torch.distributed``: data parallel (DDP / FSDP2) and expert parallel.

Model code stays single-device; these functions are applied to a built model from outside:

>>> # ctx = init_distributed(cfg.parallel, num_experts=cfg.model.num_experts)
>>> # model = apply_expert_parallel(model, ctx)          # experts -> DTensor over the ep mesh + all-to-all
>>> # install_global_router_losses(model, ctx)           # load-balancing loss on global counts
>>> # model = apply_data_parallel(model, ctx, "fsdp")    # or "ddp"
>>> # ... loss.backward(); sync_expert_gradients(model, ctx); clip_grad_norm(model, 1.0, ctx); opt.step()
"""

from moe_lab.parallel.checkpoint import (
    export_consolidated,
    is_distributed_checkpoint,
    load_distributed,
    save_distributed,
)
from moe_lab.parallel.config import ParallelConfig
from moe_lab.parallel.data_parallel import (
    all_reduce_mean,
    apply_data_parallel,
    clip_grad_norm,
    install_global_router_losses,
    sync_expert_gradients,
    unwrap,
)
from moe_lab.parallel.expert_parallel import ExpertParallelExperts, apply_expert_parallel, is_expert_param
from moe_lab.parallel.mesh import (
    ParallelContext,
    check_port_free,
    init_distributed,
    shutdown,
    single_process_context,
)

__all__ = [
    "ExpertParallelExperts",
    "ParallelConfig",
    "ParallelContext",
    "all_reduce_mean",
    "apply_data_parallel",
    "apply_expert_parallel",
    "check_port_free",
    "clip_grad_norm",
    "export_consolidated",
    "init_distributed",
    "install_global_router_losses",
    "is_distributed_checkpoint",
    "is_expert_param",
    "load_distributed",
    "save_distributed",
    "shutdown",
    "single_process_context",
    "sync_expert_gradients",
    "unwrap",
]
