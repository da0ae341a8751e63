"""Statistics of the global batch under DDP (model.py's batch norm and covariance penalty): each rank
holds a share of the batch, but 1 and N ranks must train the same model."""
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as collectives
import torch.nn as nn


def all_ranks_sum(x):
    """x summed over the ranks (when torch.distributed is on). Gradients flow back through the
    all-reduce, so each rank's loss is differentiated through the global statistics."""
    if not (dist.is_available() and dist.is_initialized()):
        return x
    return collectives.all_reduce(x, "sum", dist.group.WORLD)  # differentiable (torch.distributed.nn's is deprecated)


def global_mean(x):
    """The mean of x (N, ...) over its first dimension and all ranks' rows; and the global N."""
    n = all_ranks_sum(torch.tensor(float(x.shape[0]), device=x.device))
    return all_ranks_sum(x.sum(0)) / n, n


class GlobalBatchNorm(nn.BatchNorm1d):
    """BatchNorm1d over (N, C) with the global batch's statistics in training (SyncBatchNorm's job,
    on CPU/gloo too); nn.BatchNorm1d's state_dict and eval mode."""

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        x = x.float()  # statistics in float32, as autocast runs batch norm
        mean, n = global_mean(x)
        var = global_mean((x - mean).pow(2))[0]  # biased, for normalising (as BatchNorm)
        with torch.no_grad():  # running statistics: unbiased, with momentum (as BatchNorm)
            self.running_mean.lerp_(mean.detach(), self.momentum)
            self.running_var.lerp_(var.detach() * n / (n - 1), self.momentum)
            self.num_batches_tracked += 1
        return (x - mean) / torch.sqrt(var + self.eps)
