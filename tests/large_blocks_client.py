"""Exercises the malloc functions of the process it runs in, through ctypes; run under
LD_PRELOAD=libppmoco_large_blocks.so by tests/test_large_blocks.py. One scenario per argument; each
prints "ok" at its end and fails with an AssertionError where the allocator is wrong."""
import ctypes
import os
import random
import sys
import threading
import time

LARGE = 128 << 10
PAGE = 4096
libc = ctypes.CDLL(None)
for name, restype, argtypes in (
        ("malloc", ctypes.c_void_p, [ctypes.c_size_t]),
        ("free", None, [ctypes.c_void_p]),
        ("calloc", ctypes.c_void_p, [ctypes.c_size_t, ctypes.c_size_t]),
        ("realloc", ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t]),
        ("memalign", ctypes.c_void_p, [ctypes.c_size_t, ctypes.c_size_t]),
        ("aligned_alloc", ctypes.c_void_p, [ctypes.c_size_t, ctypes.c_size_t]),
        ("valloc", ctypes.c_void_p, [ctypes.c_size_t]),
        ("posix_memalign", ctypes.c_int, [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t, ctypes.c_size_t]),
        ("malloc_usable_size", ctypes.c_size_t, [ctypes.c_void_p])):
    function = getattr(libc, name)
    function.restype, function.argtypes = restype, argtypes


def stats():
    """(address, pages handed out, in use, free, reserved) of the range."""
    out = (ctypes.c_size_t * 5)()
    libc.ppmoco_large_blocks_stats(out)
    return tuple(out)


def in_range(ptr):
    start, _, _, _, reserved = stats()
    return start <= ptr < start + reserved * PAGE


def fill(ptr, size, byte):
    ctypes.memset(ptr, byte, size)


def holds(ptr, size, byte):
    """Whether the block's first, middle and last bytes (a page each) still hold `byte`."""
    span = min(size, PAGE)
    return all(ctypes.string_at(at, span) == bytes([byte]) * span
               for at in (ptr, ptr + (size - span) // 2, ptr + size - span))


def churn(seed, rounds):
    """Blocks of random sizes on both sides of LARGE, each filled with its own byte and checked
    before it is freed: a block handed out twice, or overlapping another, is overwritten."""
    rng = random.Random(seed)
    live = {}
    for _ in range(rounds):
        if live and rng.random() < 0.5:
            ptr, (size, byte) = live.popitem()
            assert holds(ptr, size, byte), f"block {ptr:#x} of {size} bytes overwritten"
            libc.free(ptr)
            continue
        size = rng.choice([rng.randrange(1, LARGE), rng.randrange(LARGE, 8 << 20)])
        kind = rng.randrange(4)
        if kind == 0:
            ptr = libc.calloc(1, size)
            assert ctypes.string_at(ptr, size) == bytes(size), "calloc returned memory that is not zero"
        elif kind == 1:
            out = ctypes.c_void_p()
            assert libc.posix_memalign(ctypes.byref(out), 64, size) == 0
            ptr = out.value
            assert ptr % 64 == 0
        else:
            ptr = libc.malloc(size)
        assert ptr and libc.malloc_usable_size(ptr) >= size
        byte = rng.randrange(1, 256)
        fill(ptr, size, byte)
        live[ptr] = (size, byte)
    for ptr, (size, byte) in live.items():
        assert holds(ptr, size, byte)
        libc.free(ptr)


def scenario_churn():
    threads = [threading.Thread(target=churn, args=(seed, 3000)) for seed in range(4)]
    for thread in threads:  # ctypes calls release the GIL: the four threads allocate at once
        thread.start()
    for thread in threads:
        thread.join()
    churn(4, 3000)


def scenario_reuse():
    """Freed neighbours merge, the best fit is taken, and a repeated pattern of blocks (a training
    step's) reuses the same pages instead of growing the range."""
    mib = 32 << 20  # larger than any hole the interpreter's start-up may have left
    a, b, c = (libc.malloc(mib) for _ in range(3))
    assert in_range(a) and b == a + mib and c == b + mib, "blocks are not laid out one after another"
    libc.free(a)
    libc.free(b)
    merged = libc.malloc(2 * mib)
    assert merged == a, "two freed neighbours did not merge into one block"
    small = libc.malloc(3 * mib)
    assert small == c + mib, "a block larger than every free one is not taken from the top"
    libc.free(merged)
    fitting = libc.malloc(mib + PAGE)
    assert fitting == a, "the free block that holds the request was not used"
    for ptr in (fitting, small, c):
        libc.free(ptr)
    # Best fit among free blocks of one size class: the smaller, though freed before the larger.
    larger, guard, smaller, guard2 = (libc.malloc(pages * PAGE) for pages in (620, 40, 600, 40))
    libc.free(smaller)
    libc.free(larger)
    assert libc.malloc(590 * PAGE) == smaller, "not the best fit"
    # A free block at the top grows into a request no free block holds, instead of being left behind.
    beyond = (stats()[3] + 64) * PAGE  # more than all free pages together
    last = libc.malloc(beyond)
    libc.free(last)
    grown = libc.malloc(2 * beyond)
    assert grown <= last, "the free block at the top was not grown"
    libc.free(grown)
    rng = random.Random(0)
    sizes = [rng.randrange(LARGE, 16 << 20) for _ in range(200)]
    order = list(range(200))
    rng.shuffle(order)
    tops = []
    for _ in range(4):
        blocks = [libc.malloc(size) for size in sizes]
        for i in order:
            libc.free(blocks[i])
        tops.append(stats()[1])
    assert tops[1:] == tops[:1] * 3, f"the same blocks again grew the range: {tops} pages"
    _, top, used, free, _ = stats()
    assert free == top - used, "free pages miscounted"


def scenario_calloc_after_reuse():
    size = 3 << 20
    ptr = libc.malloc(size)
    fill(ptr, size, 0xAB)
    libc.free(ptr)
    again = libc.calloc(size // 8, 8)
    assert again == ptr, "the freed block was not reused"
    assert ctypes.string_at(again, size) == bytes(size), "calloc handed out an earlier block's bytes"
    libc.free(again)


def scenario_realloc():
    ptr = libc.malloc(LARGE)
    fill(ptr, LARGE, 7)
    grown = libc.realloc(ptr, 4 * LARGE)
    assert holds(grown, LARGE, 7), "growing lost the contents"
    fill(grown, 4 * LARGE, 9)
    assert libc.realloc(grown, 4 * LARGE - 100) == grown, "a shrink within the block moved it"
    small = libc.realloc(grown, 1000)
    assert not in_range(small) and ctypes.string_at(small, 1000) == bytes([9]) * 1000
    big = libc.realloc(small, 2 * LARGE)  # glibc's block stays glibc's
    assert ctypes.string_at(big, 1000) == bytes([9]) * 1000
    libc.free(big)
    assert libc.realloc(libc.malloc(LARGE), 0) is None
    assert libc.realloc(None, LARGE) is not None


def scenario_alignment():
    for alignment in (8, 64, PAGE, 2 << 20):
        for size in (100, LARGE, 5 << 20):
            for ptr in (libc.memalign(alignment, size), libc.aligned_alloc(alignment, size)):
                assert ptr % alignment == 0, (alignment, size)
                assert in_range(ptr) == (size >= LARGE and alignment <= PAGE), (alignment, size)
                fill(ptr, size, 1)
                libc.free(ptr)
    assert libc.valloc(LARGE) % PAGE == 0
    out = ctypes.c_void_p()
    assert libc.posix_memalign(ctypes.byref(out), 3, LARGE) == 22  # EINVAL: not a power of two


def scenario_fork():
    """Forks while other threads allocate: each child allocates on, so the lock was not left taken
    (a child forked while a thread held it would wait forever)."""
    stop = threading.Event()

    def busy():
        while not stop.is_set():
            libc.free(libc.malloc(2 * LARGE))

    threads = [threading.Thread(target=busy) for _ in range(2)]
    for thread in threads:
        thread.start()
    hung = 0
    for _ in range(200):
        pid = os.fork()
        if pid == 0:
            libc.free(libc.malloc(3 * LARGE))
            os._exit(0)
        for _ in range(500):  # 5 s
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                break
            time.sleep(0.01)
        else:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            hung += 1
    stop.set()
    for thread in threads:
        thread.join()
    assert hung == 0, f"{hung} of 200 children forked while allocating hung in malloc"


def scenario_double_free():
    ptr = libc.malloc(LARGE)
    libc.free(ptr)
    libc.free(ptr)


def scenario_interior_pointer():
    ptr = libc.malloc(LARGE)
    libc.free(ptr + 16)


if __name__ == "__main__":
    globals()[f"scenario_{sys.argv[1]}"]()
    print("ok")
