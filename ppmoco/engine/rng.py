"""The random generators a training process draws from, saved and restored on any device count.

`paddle.get_rng_state()` on a GPU returns one state per visible GPU, and `paddle.set_rng_state`
refuses a list of another length, so a checkpoint written on 8 visible GPUs would not resume on 4,
nor on the CPU. A process draws from two generators: the CPU one and its own device's. Those two
are what is saved, each state carrying its device (-1 for the CPU, the GPU's index otherwise), and
on resume each is restored where this process has such a generator; what cannot be restored (a GPU
state on a CPU run) is reported, and random draws then differ from an uninterrupted run.
"""
import paddle

from ppmoco.paddle_internals import rng_state_tuples

CPU = -1  # the device field of the CPU generator's state


def _gpu_index(device):
    """This process's GPU index, or None on the CPU (`device` is RunEnv.device)."""
    if device != "gpu":
        return None
    place = paddle.get_device()  # "gpu:3"
    return int(place.split(":")[1]) if ":" in place else 0


def _device_of(state):
    (device, _, _, _), = rng_state_tuples([state])
    return device


def capture_random_state(device):
    """[the CPU generator's state, this process's GPU generator's state (on a GPU run)]."""
    states = list(paddle.get_rng_state("cpu"))
    index = _gpu_index(device)
    if index is not None:
        states.append(paddle.get_cuda_rng_state()[index])
    return states


def restore_random_state(states, device):
    """Set the generators `states` (capture_random_state's, or an older checkpoint's one state per
    visible GPU) hold a state for on `device`; return a phrase naming what could not be restored,
    or None."""
    cpu = [s for s in states if _device_of(s) == CPU]
    gpus = [s for s in states if _device_of(s) != CPU]
    if cpu:
        paddle.set_rng_state(cpu[:1], device="cpu")
    index = _gpu_index(device)
    if not gpus:
        return None
    if index is None:
        return f"the GPU generator's state (this run is on the {device})"
    # This process's GPU's own state, else the one state a newer checkpoint holds (rank 0's GPU).
    own = [s for s in gpus if _device_of(s) == index] or (gpus if len(gpus) == 1 else [])
    if not own:
        return (f"GPU {index}'s generator state (the checkpoint holds those of GPUs "
                f"{sorted(_device_of(s) for s in gpus)})")
    current = paddle.get_cuda_rng_state()
    current[index] = own[0]
    paddle.set_cuda_rng_state(current)
    return None
