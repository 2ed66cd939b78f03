"""The C++ CPU backend from csrc/: loads the extension and says clearly when it is not available."""


def unavailable_reason():
    """None when the C++ kernels can run, else a sentence saying why not."""
    return "the C++ CPU kernels (csrc/) are not part of this version yet; use backend='torch' or 'auto' on the CPU"
