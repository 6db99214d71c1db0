"""The exponential moving average that makes a momentum encoder trail its online encoder."""
import math

import paddle


@paddle.no_grad()
def momentum_update(pairs, m):
    """target <- m * target + (1 - m) * online, in place, for every (online, target) tensor pair.

    Stateless: the caller picks the pairs (MoCo leaves BatchNorm's running statistics out) and the
    momentum. The result is assigned into the target's own storage rather than rebinding a name, so
    the optimizer and the state dict that share the tensor see the update; no_grad keeps the average
    out of any autograd graph. Under O2 mixed precision the
    online tensor may be float16/bfloat16 while the target stays float32: Paddle promotes the sum
    to float32, so the average is taken in the target's precision (tests/engine/test_amp.py).
    """
    for online, target in pairs:
        paddle.assign(target * m + online * (1.0 - m), output=target)


def cosine_momentum(base, fraction):
    """The momentum at `fraction` (Progress.fraction) of a run that raises it from `base` to 1 along a
    half cosine, per iteration: 1 - (1 - base) * (1 + cos(pi * fraction)) / 2 (MoCo v3's --moco-m-cos)."""
    return 1.0 - (1.0 - base) * 0.5 * (1.0 + math.cos(math.pi * fraction))
