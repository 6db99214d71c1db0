"""LARS as MoCo v3 defines it (facebookresearch/moco-v3, moco/optimizer.py), on Paddle's optimizer.

For each parameter p with gradient g, at learning rate lr:
- more than one dimension (convolution and linear weights): d = g + weight_decay * p, scaled by the
  trust ratio q = trust_coefficient * ||p|| / ||d|| (q = 1 where ||p|| or ||d|| is 0);
- one dimension (biases, normalisation scales and shifts): d = g, without weight decay or scaling;
- then mu = momentum * mu + d and p = p - lr * mu.

Paddle's own LarsMomentumOptimizer computes another update: its trust ratio divides by
||g|| + weight_decay * ||p|| instead of ||g + weight_decay * p||, it scales 1-D parameters as well,
and it keeps lr inside the velocity (v = momentum * v + lr * ...; p = p - v), so its steps differ
from these as soon as the learning rate changes (warmup, cosine).

The class is a paddle.optimizer.Optimizer written on the hooks each of Paddle's own optimizers
implements (`_create_accumulators`, `_append_optimize_op`), so it has Paddle's parameter groups
(each may set weight_decay, momentum, trust_coefficient and a `learning_rate` multiplier),
set_lr/get_lr, clear_grad, state_dict/set_state_dict (its state is one `mu` accumulator per
parameter), the float16 loss scaler's skipped steps, and O2's float32 master weights
(`paddle.amp.decorate` turns on `multi_precision`: the update runs on the float32 copy and the
parameter receives its cast). tests/engine/test_lars.py checks it against the formula and against
moco-v3's optimizer written in PyTorch.
"""
import paddle
from paddle.optimizer import Optimizer


class LARS(Optimizer):
    """LARS with MoCo v3's update (see the module docstring)."""

    _velocity_acc_str = "mu"  # ppmoco.optimizers.OPTIMIZERS["LARS"] names it

    def __init__(self, learning_rate, parameters, momentum=0.9, weight_decay=0.0, trust_coefficient=0.001,
                 multi_precision=False):
        # Set before Optimizer.__init__, which adds the parameter groups (_add_param_group below).
        self._group_defaults = {"momentum": momentum, "weight_decay": float(weight_decay),
                                "trust_coefficient": trust_coefficient, "grad_clip": None}
        # No weight_decay for Paddle: it would add L2 decay to every gradient before this update.
        super().__init__(learning_rate=learning_rate, parameters=parameters, weight_decay=None)
        self.type = "lars"
        self._multi_precision = multi_precision
        self._update_param_group(self._group_defaults)

    def _add_param_group(self, param_group):
        """Paddle's, without its L2 regularizer on each parameter (the decay is this update's)."""
        params = param_group["params"]
        param_group["params"] = [params] if isinstance(params, paddle.Tensor) else list(params)
        for key, value in self._group_defaults.items():
            param_group.setdefault(key, value)
        seen = {id(p) for group in self._param_groups for p in group["params"]}
        if any(id(p) in seen for p in param_group["params"]):
            raise ValueError("some parameters appear in more than one parameter group")
        for param in param_group["params"]:
            param.optimize_attr["learning_rate"] = param_group.get("learning_rate", 1.0)
        self._param_groups.append(param_group)

    def _update_param_group(self, group):
        self._momentum = group.get("momentum", self._group_defaults["momentum"])
        self._weight_decay = group.get("weight_decay", self._group_defaults["weight_decay"])
        self._trust_coefficient = group.get("trust_coefficient", self._group_defaults["trust_coefficient"])
        return group.get("params")

    def _uses_master_weight(self, param):
        return self._multi_precision and param.dtype in (paddle.float16, paddle.bfloat16)

    def _create_accumulators(self, block, parameters):
        if isinstance(parameters, dict):
            parameters = self._update_param_group(parameters)
        for param in parameters:
            if param.name in self._already_create_accumulator:
                continue
            target = self._create_master_weight(param) if self._uses_master_weight(param) else param
            self._add_accumulator(self._velocity_acc_str, target)
            self._already_create_accumulator.add(param.name)

    def _append_optimize_op(self, block, param_and_grad):
        if isinstance(param_and_grad, dict):
            param_and_grad = self._update_param_group(param_and_grad)
        param, grad = param_and_grad
        mu = self._get_accumulator_master(self._velocity_acc_str, param)
        lr = self._create_param_lr(param_and_grad)
        master = self._master_weights[param.name] if self._uses_master_weight(param) else None
        p = param if master is None else master
        d = grad.astype(p.dtype)
        if p.ndim > 1:  # not a bias or a normalisation layer's scale or shift
            d = d + self._weight_decay * p
            # sqrt(sum(x * x)): paddle.linalg.norm's float32 CPU sum drifts by 2e-3 over the 8.4M entries of
            # ResNet-50's projector weight, and the trust ratio with it
            p_norm, d_norm = paddle.sqrt(paddle.sum(p * p)), paddle.sqrt(paddle.sum(d * d))
            one = paddle.ones_like(p_norm)
            q = paddle.where(p_norm > 0, paddle.where(d_norm > 0, self._trust_coefficient * p_norm / d_norm, one),
                             one)
            d = d * q
        paddle.assign(self._momentum * mu + d, output=mu)
        paddle.assign(p - lr.astype(p.dtype) * mu, output=p)
        if master is not None:
            paddle.assign(master.astype(param.dtype), output=param)
