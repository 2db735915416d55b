"""cupy.cuda.memory's allocation classes, as the overlap checks see them: an
array's .data.mem is a PooledMemory per emulated allocation (so views of one
allocation share it, as in CuPy), and a DLPackMemory for an array imported
through DLPack (CuPy makes a new wrapper at every import)."""


class BaseMemory:
    pass


class Memory(BaseMemory):
    pass


class PooledMemory(BaseMemory):
    pass


class MemoryAsync(BaseMemory):
    pass


class ManagedMemory(BaseMemory):
    pass


class UnownedMemory(BaseMemory):
    pass


class DLPackMemory(BaseMemory):
    """(cupy._core.dlpack's class in CuPy)"""
