from . import memory  # noqa: F401,E402  (cupy.cuda.memory)


class _Device:
    id = 0
    attributes = {"MultiProcessorCount": 132}
    compute_capability = "90"     # an H100: thread-block clusters available

    def __init__(self, *args):
        pass

    def synchronize(self):
        pass


def Device(*args):  # noqa: N802 - CuPy's spelling
    return _Device()


class runtime:  # noqa: N801
    cudaDevAttrMultiProcessorCount = 16
    streamPerThread = 2

    @staticmethod
    def getDeviceCount():  # noqa: N802
        return 1

    @staticmethod
    def getDevice():  # noqa: N802
        return 0

    # an H100's answers where bncore_gpu asks: 97 MaxSharedMemoryPerBlockOptin,
    # 120 ClusterLaunch, 16 MultiProcessorCount (132 SMs, so that small channel
    # counts take the three-kernel path as they do there); 4 for anything else
    attributes = {97: 232448, 120: 1, 16: 132, 95: 1}

    @staticmethod
    def deviceGetAttribute(attr, dev):  # noqa: N802
        return runtime.attributes.get(attr, 4)


class Event:
    # an emulated kernel has run by the time its launch returns, and no time
    # passes on the device: a queued spin kernel (scripts/bench_gpu.py's
    # gpu_only_us) has never "finished" while the host queues behind it
    done = False

    def record(self, *a):
        pass

    def synchronize(self):
        pass


def get_elapsed_time(a, b):
    return 0.0


class driver:  # noqa: N801
    # blocks of the cooperative rows kernels resident per SM on an H100 (64
    # registers x 256 threads of 65536)
    OCCUPANCY = 4

    @staticmethod
    def occupancyMaxActiveBlocksPerMultiprocessor(func, block_size, smem):  # noqa: N802
        return driver.OCCUPANCY


class _Stream:
    ptr = 0                   # the legacy default stream

    def is_capturing(self):
        return False          # no CUDA graphs here


_streams = []                 # the streams entered with `with`, innermost last


class Stream(_Stream):
    """A stream of its own handle; work runs at once here, so only the handle
    (what caches key on) differs from the default stream's."""
    _last = 0x100

    def __init__(self, non_blocking=False):
        Stream._last += 0x10
        self.ptr = Stream._last

    def __enter__(self):
        _streams.append(self)
        return self

    def __exit__(self, *exc):
        _streams.pop()

    def synchronize(self):
        pass


class _PerThreadStream(Stream):
    """cupy.cuda.Stream.ptds: every thread's own default stream, one handle."""

    def __init__(self):
        self.ptr = runtime.streamPerThread


Stream.ptds = _PerThreadStream()


def get_current_stream():
    return _streams[-1] if _streams else _Stream()
